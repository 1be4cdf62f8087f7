"""The credibility rules for the grid meter: range, unconfirmed jumps, frozen readings."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from essd.credibility.types import (
    MIN_POWER_TOLERANCE_W,
    CredibilitySettings,
    MeterCause,
    MeterVerdict,
)


@dataclass(frozen=True, slots=True)
class MeterTrack:
    net_w: float | None = None  # net load at the last accepted reading
    battery_w: float | None = None  # credible battery total at the last reading
    raw_w: float | None = None  # the last raw value
    pending_net_w: float | None = None  # an unconfirmed jump
    frozen_at_w: float | None = None  # the value a frozen meter is stuck at


def assess_meter(
    cfg: CredibilitySettings,
    track: MeterTrack,
    grid: float | None,
    battery_w: float,
    hidden_move_w: float,
) -> tuple[MeterTrack, MeterVerdict]:
    if grid is None or not math.isfinite(grid):
        verdict = MeterVerdict(False, None, MeterCause.NO_READING, "no valid meter reading")
        return replace(track, pending_net_w=None), verdict
    if abs(grid) > cfg.connection_max_w:
        detail = f"{grid:.0f} W is beyond the connection's +-{cfg.connection_max_w:.0f} W"
        return track, MeterVerdict(False, None, MeterCause.OUT_OF_RANGE, detail)
    # A repeated reading hides what the batteries did since: more than the margin the guard
    # keeps inside the tighter limit, and a limit could be crossed unseen.
    moved = track.battery_w is not None and abs(battery_w - track.battery_w) > max(
        hidden_move_w, MIN_POWER_TOLERANCE_W
    )
    if track.frozen_at_w is not None and grid == track.frozen_at_w:
        detail = f"stuck at {grid:.0f} W"
        return replace(track, battery_w=battery_w), MeterVerdict(
            False, None, MeterCause.FROZEN, detail
        )
    if track.raw_w is not None and grid == track.raw_w and moved:
        detail = f"stuck at {grid:.0f} W while the batteries moved"
        new = replace(track, frozen_at_w=grid, battery_w=battery_w, pending_net_w=None)
        return new, MeterVerdict(False, None, MeterCause.FROZEN, detail)
    track = replace(track, frozen_at_w=None, raw_w=grid, battery_w=battery_w)
    net = grid + battery_w
    unconfirmed = _unconfirmed(cfg, track, net)
    if unconfirmed is not None:
        return replace(track, pending_net_w=net), MeterVerdict(
            False, None, MeterCause.UNCONFIRMED_JUMP, unconfirmed
        )
    return replace(track, net_w=net, pending_net_w=None), MeterVerdict(True, grid)


def _unconfirmed(cfg: CredibilitySettings, track: MeterTrack, net: float) -> str | None:
    """Why the net load ``net`` must wait for the next reading to confirm it, or None.

    A jump beyond a load step must be confirmed by a next reading close to it. The first
    reading after start has no history to be checked against and is taken as it is (a glitch
    exactly then steers one cycle; the range check still applies).
    """
    pending = track.pending_net_w
    if track.net_w is None or abs(net - track.net_w) <= cfg.max_load_step_w:
        return None
    if pending is None or abs(net - pending) > cfg.max_load_step_w / 2.0:
        return (
            f"net load jumped {net - track.net_w:+.0f} W (max step "
            f"{cfg.max_load_step_w:.0f} W): waiting for a second reading"
        )
    return None
