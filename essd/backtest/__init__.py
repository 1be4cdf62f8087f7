"""``essd backtest``: replay a measured site history through the real controller (forecasters,
optimizer, ladder, guard) on a stepped clock against an in-memory plant, and score it against
no battery and the perfect-foresight optimum (docs/backtest.md).

- :mod:`essd.backtest.history`: HISTORY.csv;
- :mod:`essd.backtest.plant`: the replayed storage units and meter behind the driver API;
- :mod:`essd.backtest.runner`: the replay;
- :mod:`essd.backtest.score`: the cost definition and the perfect-foresight optimum;
- :mod:`essd.backtest.results`: the figures per window and day;
- :mod:`essd.backtest.report`: the per-step CSV and plots;
- :mod:`essd.backtest.cli`: the command.
"""
