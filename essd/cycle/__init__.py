"""The control cycle: read -> snapshot -> forecast -> decide -> guard -> write -> publish.

Each phase is named and timed. Reads of all devices run concurrently, each within its own
timeout. The optimizer runs in a worker thread under a time budget, so a slow solve never
stalls reads, writes or the watchdog: a solve still running when the budget ends is left to
finish in its thread, and the cycle falls back (last plan shifted, else rule-based). Writes
happen last, only for setpoints the safety supervisor produced. Values leave the core only as
events on the bus.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid W > 0 imports.

One module per phase: :mod:`.forecasting`, :mod:`.decide`, :mod:`.guarding`, :mod:`.write`;
:mod:`.accounting` adds up what the site did, :mod:`.plan_codec` is the durable form of a plan,
and :mod:`.controller` runs them in order.
"""

from essd.commands import CommandRejected
from essd.cycle.controller import Controller
from essd.cycle.decide import Mode

__all__ = ["CommandRejected", "Controller", "Mode"]
