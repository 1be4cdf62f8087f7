"""The write test of ``essd probe``: charge / idle / discharge / idle with read-back.

Every write is read back by the driver (a mismatch fails the test). After each step the unit is
read: charging must read as power < 0, discharging as > 0 (essd's sign); a wrong sign fails the
test (a sign or command error), no response yet is only noted. Whatever happens (a failure, an
exception, Ctrl-C), the unit is put back to idle: its safe mode when it has one, else 0 W.

Battery power in W: > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from drivers.api import ActivePowerControl, DeviceDriver, SafeModeControl
from drivers.profile import Profile
from essd.domain import BatteryReading

if TYPE_CHECKING:
    from essd.clock import Clock
    from essd.probe import Report


TEST_FRACTION = 0.1  # of the rating
TEST_MAX_W = 1000.0  # a small cycle, whatever the rating
NO_RESPONSE_FRACTION = 0.01  # of the rating: below this the unit has not moved (yet)


async def _idle(driver: DeviceDriver) -> str:
    safe = driver.capability(SafeModeControl)
    if safe is not None:
        await safe.safe_mode()
        return "safe mode"
    power = driver.capability(ActivePowerControl)
    if power is not None:
        await power.set_active_power(0.0, duration_s=60.0)
        return "0 W"
    return "nothing to idle"


async def write_cycle(
    profile: Profile,
    driver: DeviceDriver,
    report: Report,
    *,
    confirm: Callable[[str], bool],
    step_s: float,
    clock: Clock,
    out: Callable[[str], object] = print,
) -> None:
    """Run the cycle on ``driver`` (asking ``confirm`` first) and add to ``report``; each step
    waits ``step_s`` on ``clock`` (the device's own time to respond)."""
    control = driver.capability(ActivePowerControl)
    if control is None:
        report.notes.append(f"write test: {profile.name} has no power setpoint; nothing written")
        return
    rating = min(profile.ratings.max_charge_w, profile.ratings.max_discharge_w)
    power = round(min(TEST_FRACTION * rating, TEST_MAX_W))
    question = (
        f"--write-test writes to the device: charge {power} W, idle, discharge {power} W, idle, "
        f"{step_s:g} s each, then idle."
    )
    if not confirm(question):
        report.failures.append("write test: not confirmed, nothing written")
        return
    ttl = max(60.0, 3 * step_s)
    try:
        for label, setpoint in (
            ("charge", -power),
            ("idle", 0.0),
            ("discharge", float(power)),
            ("idle", 0.0),
        ):
            result = await control.set_active_power(setpoint, duration_s=ttl)
            for mismatch in result.mismatches:
                report.failures.append(f"write test {label}: read back differs: {mismatch}")
            await clock.sleep(step_s)
            reading = await driver.read()
            if not isinstance(reading, BatteryReading) or reading.power_w.value is None:
                report.failures.append(f"write test {label}: battery power not readable")
                continue
            got = reading.power_w.value
            out(f"write test {label}: commanded {setpoint:g} W, reads {got:g} W")
            if abs(got) < NO_RESPONSE_FRACTION * rating:
                if setpoint:
                    report.notes.append(f"write test {label}: no response within {step_s:g} s")
            elif setpoint and (got > 0) != (setpoint > 0):
                report.failures.append(
                    f"write test {label}: commanded {setpoint:g} W but the unit reads {got:g} W "
                    "(sign of the power register or the command is wrong)"
                )
    finally:
        how = await _idle(driver)
        out(f"write test: unit left idle ({how})")
