"""Prometheus metrics: an exporter fed by the event bus, and its HTTP endpoint.

The control core never calls this module: :class:`MetricsExporter` subscribes to the
:class:`~essd.events.EventBus` and turns events into metrics in its own
:class:`~prometheus_client.CollectorRegistry` (not the process-global one, so a test can build
several). :class:`MetricsServer` (in :mod:`essd.metrics.http`) serves that
registry over HTTP on the daemon's event loop, bound to 127.0.0.1 unless configured otherwise
(``metrics.bind`` / ``metrics.port``), from :attr:`MetricsExporter.exposition_cache`: the
registry is rendered at most once per cycle, however often it is scraped.

Names follow the Prometheus conventions: prefix ``essd_``, base units (``_watts``,
``_joules_total`` for energy, ``_ratio``, ``_seconds``, ``_grams``), counters end in ``_total``.
Sign conventions as everywhere in essd: battery W > 0 discharges into the site, < 0 charges;
grid W > 0 imports, < 0 exports. Prices are per kWh in the tariff currency (``essd_site_info``
names it), because no base unit for money exists and operators read tariffs per kWh.

Label values come from fixed sets or from the configuration (device ids): free text, such as
a plan's reason, is mapped to a small set of categories (:func:`reason_category`) and names
that arrive from outside (error kinds, command names) are capped (:class:`BoundedLabel`), so a
misbehaving peer cannot blow up the number of series.

Current values (power, SoC, limits, ages, cumulative counters) are rendered from the last
:class:`~essd.events.CycleCompleted` by a custom collector: ages are measured against the
daemon's clock when the payload is rendered (after each cycle, and again once it is a second
old), so a stalled loop shows as a growing age.
Distributions (cycle, phase, solve and Modbus latency) are histograms updated per event.

Modules: :mod:`essd.metrics.exporter` (the exporter and its histograms and counters),
:mod:`essd.metrics.live` (the values rendered at scrape time), :mod:`essd.metrics.labels` (label
sets and caps), :mod:`essd.metrics.http` (the HTTP endpoint).
"""

from essd.metrics.exporter import MetricsExporter
from essd.metrics.http import MetricsServer, MetricsServerError
from essd.metrics.labels import (
    REASON_CATEGORIES,
    BoundedLabel,
    reason_category,
    solver_failure_cause,
)

__all__ = [
    "REASON_CATEGORIES",
    "BoundedLabel",
    "MetricsExporter",
    "MetricsServer",
    "MetricsServerError",
    "reason_category",
    "solver_failure_cause",
]
