"""The driver side of profile schema 2, over a real socket against the simulator's image: the
write function code, on-change writes with their refresh, per-register word order, and state
severities (a warning never faults the device, a fault does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drivers.api import ActivePowerControl, DeviceExceptionResponse, ValueRefused
from drivers.factory import make_driver
from drivers.profile_loader import (
    load_profile,
    load_profile_text,
    resolve_profile,
    shipped_profiles_dir,
)
from essd.clock import SimClock
from essd.config import Settings
from essd.domain import BatteryReading
from hil_sim.profile_image import ProfileImage
from hil_sim.runner import SimulatedSite
from tests.support.devices import serve_profile
from tests.support.hil_sim import endpoint_for


def _image(name: str) -> ProfileImage:
    profile = resolve_profile(name)
    image = ProfileImage(profile)
    for spec in profile.registers:  # in range, so every write reads back as written
        if spec.min is not None:
            image.set_value(spec.name, spec.min)
    return image


async def test_function_16_for_one_register_where_the_profile_says_so() -> None:
    image = _image("goodwe-et")
    async with serve_profile(image.profile, image=image) as dev:
        result = await dev.driver.set_active_power(-2000.0, duration_s=60.0)  # type: ignore[attr-defined]
    assert result.ok
    assert result.registers_written == 2
    assert image.function_counts == {16: 2}  # EMSPowerMode and EMSPowerSet, one word each
    assert image.value("ems_power_mode").value == 11  # Charge Bat
    assert image.value("ems_power_set").value == 2000


async def test_the_simulated_device_refuses_function_6_where_it_takes_only_16() -> None:
    image = _image("goodwe-et")
    async with serve_profile(image.profile, image=image) as dev:
        addr = image.spec("ems_power_mode").address
        assert addr is not None
        with pytest.raises(DeviceExceptionResponse, match="ILLEGAL_FUNCTION"):
            await dev.endpoint.write_registers(addr, [8], image.profile.transport.unit)


async def test_default_is_function_6_for_one_register() -> None:
    image = _image("sungrow-sh-rt")
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        await dev.driver.set_active_power(1000.0, duration_s=60.0)  # type: ignore[attr-defined]
    assert image.function_counts == {6: 3}


async def test_on_change_writes_only_what_changed_and_refreshes() -> None:
    clock = SimClock(0.0)
    image = _image("sungrow-sh-rt")  # set_active_power: write: on_change, refresh_s: 300
    written: list[tuple[str, ...]] = []
    image.add_write_listener(written.append)
    async with serve_profile(image.profile, image=image, clock=clock) as dev:
        drv = dev.driver
        first = await drv.set_active_power(-1000.0, duration_s=60.0)  # type: ignore[attr-defined]
        assert first.registers_written == 3
        clock.advance(20.0)
        again = await drv.set_active_power(-1000.0, duration_s=60.0)  # type: ignore[attr-defined]
        assert again.registers_written == 0  # unchanged: nothing written
        assert again.ok  # ... but read back all the same
        changed = await drv.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
        assert changed.registers_written == 1  # only the power
        clock.advance(300.0)
        refreshed = await drv.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
        assert refreshed.registers_written == 3  # refresh_s passed: everything again
        # The device lost its mode (a restart): the next call reports it, then rewrites it.
        image.set_value("ems_mode_selection", 0)
        lost = await drv.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
        assert lost.registers_written == 0
        assert [m.split(":")[0] for m in lost.mismatches] == ["ems_mode_selection"]
        healed = await drv.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
        assert healed.registers_written == 1
        assert healed.ok
    assert image.value("ems_mode_selection").value == 2
    assert written == [
        ("ems_mode_selection",),
        ("charge_discharge_command",),
        ("charge_discharge_power",),
        ("charge_discharge_power",),
        ("ems_mode_selection",),
        ("charge_discharge_command",),
        ("charge_discharge_power",),
        ("ems_mode_selection",),
    ]


async def test_actions_without_on_change_write_every_time() -> None:
    image = _image("huawei-sun2000-luna2000")
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        for _ in range(2):
            r = await dev.driver.set_charge_limit(2000.0)  # type: ignore[attr-defined]
            assert r.registers_written == 1


async def test_word_order_per_register_over_the_wire() -> None:
    image = _image("solaredge-storedge")  # f32 storage registers, low word first
    image.set_value("battery_soe", 42.5)
    image.set_value("battery_power", 1234.5)
    raw_words = image.get(*image._location(image.spec("battery_soe")))
    assert raw_words[1] == 0x422A  # 42.5 = 0x422A0000: the high word second on the wire
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        fields = await dev.driver.read_fields()
    assert fields["soc"].value == 0.425
    assert fields["power_w"].value == 1234.5


async def test_a_warning_is_reported_and_only_a_fault_faults() -> None:
    image = _image("sungrow-sh-rt")
    image.set_value("battery_level", 50.0)
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        image.set_raw("system_state", 0x0040)  # Running: info
        ok = await dev.driver.read()
        image.set_raw("system_state", 0x0002)  # Stop: warning
        warned = await dev.driver.read()
        image.set_raw("system_state", 0x0100)  # Fault
        faulted = await dev.driver.read()
        image.set_raw("system_state", 0x7777)  # not documented: the register's `unlisted`
        unknown = await dev.driver.read()
    for r in (ok, warned, faulted, unknown):
        assert isinstance(r, BatteryReading)
    assert (ok.alarms, ok.warnings) == ((), ())  # type: ignore[union-attr]
    assert warned.alarms == ()  # type: ignore[union-attr]
    assert warned.warnings == ("system_state=Stop (0x2)",)  # type: ignore[union-attr]
    assert faulted.alarms == ("system_state=Fault (0x100)",)  # type: ignore[union-attr]
    assert unknown.alarms == ()  # type: ignore[union-attr]
    assert unknown.warnings == ("system_state=unlisted value 30583 (0x7777)",)  # type: ignore[union-attr]


async def test_a_power_limit_is_written_as_a_current_at_the_live_voltage() -> None:
    image = _image("deye-sun-sg04lp3")  # 108/109 in A, divide_by battery_voltage_v (587)
    image.set_value("battery_1_voltage", 51.2)
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        r = await dev.driver.set_charge_limit(5000.0)  # type: ignore[attr-defined]
        assert r.ok
        assert image.value("battery_max_charge_current").value == 98  # 5000 W / 51.2 V
        assert image.function_counts == {16: 1}
        image.set_value("battery_1_voltage", 0.0)  # no usable voltage: nothing is written
        with pytest.raises(ValueRefused, match="battery_voltage_v is not usable"):
            await dev.driver.set_discharge_limit(3000.0)  # type: ignore[attr-defined]
    assert image.function_counts == {16: 1}


async def test_on_change_through_the_one_engine_for_a_sunspec_profile(tmp_path: Path) -> None:
    text = (shipped_profiles_dir() / "devices" / "industrial-sunspec-pcs.yaml").read_text()
    data = yaml.safe_load(text)
    data["actions"]["set_active_power"].update(write="on_change", refresh_s=20)
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "industrial-sunspec-pcs.yaml").write_text(yaml.safe_dump(data))
    settings = Settings(
        site={"id": "one", "timezone": "UTC", "grid_import_limit_w": 1e5, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        profile_dirs=(folder,),
        devices=[
            {
                "id": "pcs",
                "profile": "industrial-sunspec-pcs",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1502, "unit": 1},
            }
        ],
    )
    clock = SimClock()
    profile = load_profile(folder / "industrial-sunspec-pcs.yaml")
    async with SimulatedSite(settings, clock=clock, free_ports=True) as sim:
        endpoint, unit = endpoint_for(sim, "pcs", clock)
        driver = make_driver(profile, device_id="pcs", endpoint=endpoint, unit=unit, clock=clock)
        power = driver.capability(ActivePowerControl)
        assert power is not None
        first = await power.set_active_power(-20_000.0, duration_s=60.0)
        again = await power.set_active_power(-20_000.0, duration_s=60.0)
        clock.advance(21.0)
        refreshed = await power.set_active_power(-20_000.0, duration_s=60.0)
        await endpoint.close()
    assert (first.registers_written, again.registers_written) == (3, 0)
    assert refreshed.registers_written == 3
    assert first.ok
    assert again.ok
    assert refreshed.ok


def _merging(name: str, merge: bool | None) -> ProfileImage:
    """The shipped profile ``name``, with ``transport.merge_writes`` set to ``merge`` (None: as
    shipped)."""
    path = shipped_profiles_dir() / "devices" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    if merge is not None:
        data.setdefault("transport", {})["merge_writes"] = merge
    profile = load_profile_text(yaml.safe_dump(data, sort_keys=False), str(path))
    image = ProfileImage(profile)
    for spec in profile.registers:
        if spec.min is not None:
            image.set_value(spec.name, spec.min)
    return image


@pytest.mark.parametrize("merge", [False, True])
async def test_adjacent_steps_go_as_one_write_only_where_the_profile_allows(merge: bool) -> None:
    """household-ess-setpoint writes registers 38, 39 then 37: one block. Merged it is one
    function-16 request; otherwise one function-6 request per step, in the action's order."""
    image = _merging("household-ess-setpoint", merge)
    requests: list[tuple[str, ...]] = []
    image.add_write_listener(requests.append)
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        result = await dev.driver.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
    assert result.ok
    assert result.registers_written == 3
    if merge:
        assert image.function_counts == {16: 1}
        assert len(requests) == 1
        assert set(requests[0]) == {"hub4_disable_charge", "hub4_disable_feed_in", "hub4_setpoint"}
    else:
        assert image.function_counts == {6: 3}
        assert [r for (r,) in requests] == [
            "hub4_disable_charge",
            "hub4_disable_feed_in",
            "hub4_setpoint",
        ]
    assert image.value("hub4_setpoint").value == pytest.approx(-1500.0)  # merged or not


async def test_steps_that_are_not_one_block_are_never_merged() -> None:
    """household-hybrid-forcible's charge steps sit at 47246, 47083, 47247 and 47100: only the
    first and third are adjacent, but not consecutive in the action, so four requests."""
    image = _merging("household-hybrid-forcible", True)
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        result = await dev.driver.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
    assert result.ok
    assert sum(image.function_counts.values()) == 4


@pytest.mark.parametrize("name", ["household-ess-setpoint", "victron-gx-ess"])
async def test_the_shipped_gx_profiles_write_the_setpoint_and_its_enables_in_one_request(
    name: str,
) -> None:
    """The GX takes function 16: as shipped, a setpoint change is one request, not three."""
    image = _merging(name, None)
    async with serve_profile(image.profile, image=image, clock=SimClock(0.0)) as dev:
        result = await dev.driver.set_active_power(-1500.0, duration_s=60.0)  # type: ignore[attr-defined]
    assert result.ok
    assert image.function_counts == {16: 1}
