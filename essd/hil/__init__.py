"""Hardware-in-the-loop scenarios: the real control core against a simulated site.

``load_scenario`` validates a scenario file, ``run_scenario`` runs it on a stepped clock and
returns its figures, ``write_report`` writes ``kpis.json``, plots and a Markdown report.
"""

from essd.hil.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "load_scenario"]
