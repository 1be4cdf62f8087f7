"""Hardware-in-the-loop scenarios: the real control core against a simulated site.

``load_scenario`` validates a scenario file, ``run_scenario`` runs it on a stepped clock and
returns its figures, ``write_report`` writes ``kpis.json``, plots and a Markdown report.

The names below load on first use, so that ``essd --help`` (which registers ``essd hil``
from :mod:`essd.hil.cli`) does not import the scenario models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from essd.hil.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "load_scenario"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from essd.hil import scenario  # noqa: PLC0415

        return getattr(scenario, name)
    raise AttributeError(f"module 'essd.hil' has no attribute {name!r}")
