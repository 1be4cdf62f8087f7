"""Hardware-in-the-loop scenarios: the real control core against a simulated site.

:func:`essd.hil.scenario.load_scenario` validates a scenario file,
:func:`essd.hil.runner.run_scenario` runs it on a stepped clock and returns its figures,
:func:`essd.hil.report.write_report` writes ``kpis.json``, plots and a Markdown report.

The package itself imports nothing, so that ``essd --help`` (which registers ``essd hil``
from :mod:`essd.hil.cli`) does not import the scenario models.
"""
