"""A unit held because its power register stayed away from its command is released once it is
told what it reads (a held unit told 0 W reads exactly 0 W): found by the meter-glitches HIL
scenario, where both PCSs stayed held for hours after one slip."""

from __future__ import annotations

from essd.credibility import CredibilitySettings, UnitCause
from essd.credibility.unit import UnitTrack, _check_power_register

SETTINGS = CredibilitySettings(connection_max_w=240_000.0, max_load_step_w=30_000.0)


def test_power_register_gap_closes_when_the_command_meets_the_reading() -> None:
    track = UnitTrack()
    finding = None
    t = 0.0
    # Told -12 kW, the register reads exactly 0 W for longer than the settling time: caught.
    for _ in range(40):
        track, finding = _check_power_register(
            SETTINGS, track, cmd=-12_000.0, power=0.0, now=t, tol=1_000.0
        )
        t += 30.0
    assert finding is not None
    assert finding[0] is UnitCause.POWER_MISMATCH
    # Held at 0 W, it reads exactly 0 W: nothing stuck any more, however long it idles.
    for _ in range(200):
        track, finding = _check_power_register(
            SETTINGS, track, cmd=0.0, power=0.0, now=t, tol=1_000.0
        )
        t += 30.0
        assert finding is None
    # Told to move again and not following: caught again, after the settling time only.
    track, finding = _check_power_register(
        SETTINGS, track, cmd=20_000.0, power=0.0, now=t, tol=1_000.0
    )
    assert finding is None
    for _ in range(40):
        t += 30.0
        track, finding = _check_power_register(
            SETTINGS, track, cmd=20_000.0, power=0.0, now=t, tol=1_000.0
        )
    assert finding is not None
