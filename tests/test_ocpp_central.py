"""OCPP conformance of essd's central system against the ``ocpp`` library's own charge-point
client (hil_sim.chargers) over real WebSockets on loopback, for OCPP 1.6J and 2.0.1.

Time is a stepped SimClock: profile validity and fallback are checked by moving it, never by
waiting.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import pytest
import websockets
from pydantic import SecretStr

from essd.clock import SimClock
from essd.config_ev import ChargerConfig, OcppConfig
from essd.ocpp import CentralSystem
from hil_sim.chargers import ChargerLink, SimStation, SimVehicle

T0 = 1_767_225_600.0
VERSIONS = ["1.6", "2.0.1"]


@pytest.fixture
def clock() -> SimClock:
    return SimClock(T0)


@pytest.fixture
async def central(clock: SimClock) -> AsyncIterator[CentralSystem]:
    chargers = [
        ChargerConfig(id="cp1", rate_unit="A", phases=3, voltage_v=230.0, max_power_w=11_000.0),
        ChargerConfig(id="cpw", rate_unit="W", phases=1, max_power_w=7_400.0),
        ChargerConfig(id="cpauth", password=SecretStr("s3cret"), rate_unit="W"),
    ]
    config = OcppConfig(port=0, profile_validity_s=120.0, heartbeat_interval_s=60)
    async with CentralSystem(config, chargers, clock=clock) as cs:
        yield cs


def _url(cs: CentralSystem) -> str:
    return f"ws://127.0.0.1:{cs.port}"


def _station(clock: SimClock, cid: str = "cp1", unit: str = "A", phases: int = 3) -> SimStation:
    return SimStation(cid, clock, default_limit_w=11_000.0, rate_unit=unit, phases=phases)


@pytest.mark.parametrize("version", VERSIONS)
async def test_boot_heartbeat_and_status(
    central: CentralSystem, clock: SimClock, version: str
) -> None:
    async with ChargerLink(_station(clock), _url(central), version=version) as link:
        boot = await link.boot()
        assert boot.status == "Accepted"
        assert boot.interval == 60
        clock.advance(30.0)
        beat = await link.heartbeat()
        assert beat.current_time == "2026-01-01T00:00:30Z"
        status = "Preparing" if version == "1.6" else "Occupied"
        await link.status(1, status)
        info = central.chargers()["cp1"]
        assert info.connected
        assert info.protocol == ("ocpp1.6" if version == "1.6" else "ocpp2.0.1")
        assert (info.vendor, info.model) == ("essd-sim", "SimAC")
        assert info.connectors[1].status == status
    assert not central.chargers()["cp1"].connected


@pytest.mark.parametrize("version", VERSIONS)
async def test_transaction_meter_values_and_stop(
    central: CentralSystem, clock: SimClock, version: str
) -> None:
    station = _station(clock)
    async with ChargerLink(station, _url(central), version=version) as link:
        await link.boot()
        vehicle = SimVehicle(capacity_wh=60_000.0, energy_wh=30_000.0)
        tx = await link.plug_in(1, vehicle)
        # The vehicle waits at the charger's initial limit (0 W) until essd plans it.
        assert station.limit_w(1) == 0.0
        assert (await central.set_limit("cp1", 1, 11_000.0)).accepted
        plugged = central.plugged()
        assert [(v.charger_id, v.session_id) for v in plugged] == [("cp1", tx)]
        clock.advance(3600.0)
        await link.meter_values(1)
        meter = central.chargers()["cp1"].meter[1]
        assert meter.power_w == pytest.approx(11_000.0, rel=0.01)  # 15.9 A x 3 x 230 V
        assert meter.energy_wh == pytest.approx(11_000.0, rel=0.01)
        assert meter.soc == pytest.approx(vehicle.soc, abs=1e-3)
        assert central.plugged()[0].delivered_wh == pytest.approx(meter.energy_wh)
        await link.unplug(1)
        assert central.plugged() == []
        (done,) = central.chargers()["cp1"].transactions
        assert done.transaction_id == tx
        assert done.stopped_at == pytest.approx(T0 + 3600.0)
        assert done.meter_stop_wh == pytest.approx(11_000.0, abs=1.0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("charger", [("cp1", "A", 3), ("cpw", "W", 1)])
async def test_charging_profile_accepted_and_applied(
    central: CentralSystem, clock: SimClock, version: str, charger: tuple[str, str, int]
) -> None:
    cid, unit, phases = charger
    station = _station(clock, cid, unit, phases)
    async with ChargerLink(station, _url(central), version=version) as link:
        await link.boot()
        await link.plug_in(1, SimVehicle(capacity_wh=60_000.0, energy_wh=10_000.0))
        result = await central.set_limit(cid, 1, 4_000.0)
        assert result.accepted, result.reason
        applied = station.limit_w(1)
        if unit == "W":
            assert applied == pytest.approx(4_000.0)
        else:  # A per phase, rounded down to 0.1 A: never above the power asked for
            assert 4_000.0 - 0.1 * 230.0 * 3 < applied <= 4_000.0
        clock.advance(60.0)
        await link.meter_values(1)
        assert central.chargers()[cid].meter[1].power_w == pytest.approx(applied, abs=0.1)
        assert central.chargers()[cid].applied_limit_w[1] == 4_000.0


@pytest.mark.parametrize("version", VERSIONS)
async def test_profile_in_the_wrong_unit_is_rejected_and_counted(
    central: CentralSystem, clock: SimClock, version: str
) -> None:
    station = _station(clock, "cp1", unit="W")  # essd is configured to send A to cp1
    async with ChargerLink(station, _url(central), version=version) as link:
        await link.boot()
        await link.plug_in(1, SimVehicle(capacity_wh=60_000.0, energy_wh=10_000.0))
        before = central.chargers()["cp1"].rejected_profiles  # the initial limit's too
        result = await central.set_limit("cp1", 1, 4_000.0)
        assert not result.accepted
        assert central.chargers()["cp1"].rejected_profiles == before + 1
        assert station.limit_w(1) == 11_000.0


@pytest.mark.parametrize("version", VERSIONS)
async def test_disconnect_mid_session_falls_back_and_resumes(
    central: CentralSystem, clock: SimClock, version: str
) -> None:
    station = _station(clock, "cpw", unit="W", phases=1)
    link = ChargerLink(station, _url(central), version=version)
    async with link:
        await link.boot()
        tx = await link.plug_in(1, SimVehicle(capacity_wh=80_000.0, energy_wh=10_000.0))
        assert (await central.set_limit("cpw", 1, 3_000.0)).accepted
        clock.advance(60.0)
        assert station.limit_w(1) == 3_000.0
    # The charger lost its connection; nobody renews the profile.
    assert not central.chargers()["cpw"].connected
    result = await central.set_limit("cpw", 1, 3_000.0)
    assert not result.accepted
    assert result.reason == "not connected"
    clock.advance(120.0)  # past the profile's validity (120 s from when it was sent)
    assert station.limit_w(1) == 11_000.0, "falls back to the charger's default limit"
    station.update()
    assert station.evses[1].power_w == 11_000.0
    async with ChargerLink(station, _url(central), version=version) as again:
        await again.status(1, "Charging" if version == "1.6" else "Occupied")
        await again.meter_values(1)
        (vehicle,) = central.plugged()
        assert vehicle.session_id == tx, "the same session goes on"
        central.apply({"cpw": 2_500.0}, valid_s=120.0)
        await central.drain()
        assert station.limit_w(1) == 2_500.0


def _error(frame: str) -> tuple[str, str]:
    msg = json.loads(frame)
    assert msg[0] == 4, frame
    return msg[1], msg[2]


@pytest.mark.parametrize("version", VERSIONS)
async def test_malformed_and_unknown_messages_get_ocpp_errors(
    central: CentralSystem, clock: SimClock, version: str
) -> None:
    async with ChargerLink(_station(clock), _url(central), version=version) as link:
        await link.drop()  # the raw frames below need the socket without the client's reader
    ws = await websockets.connect(
        f"{_url(central)}/cp1",
        subprotocols=["ocpp1.6" if version == "1.6" else "ocpp2.0.1"],  # type: ignore[list-item]
    )
    try:

        async def ask(frame: str) -> str:
            await ws.send(frame)
            return str(await ws.recv())

        bad_json = "FormationViolation" if version == "1.6" else "FormatViolation"
        assert _error(await ask("this is not json")) == ("-1", bad_json)
        assert _error(await ask('{"not": "a list"}')) == ("-1", "ProtocolError")
        bad_type = "PropertyConstraintViolation" if version == "1.6" else "MessageTypeNotSupported"
        assert _error(await ask('[9, "x1", "Heartbeat", {}]')) == ("x1", bad_type)
        assert _error(await ask('[2, "x2", 42, {}]')) == ("x2", "ProtocolError")
        uid, code = _error(await ask('[2, "x3", "NoSuchAction", {}]'))
        assert uid == "x3"
        assert code in ("NotImplemented", "NotSupported")
        uid, code = _error(await ask('[2, "x4", "StatusNotification", {"connectorId": "one"}]'))
        assert uid == "x4"
        assert code in (
            "FormationViolation",
            "FormatViolation",
            "TypeConstraintViolation",
            "OccurenceConstraintViolation",
            "OccurrenceConstraintViolation",
            "ProtocolError",
        )
        # A response to nothing is dropped; the connection still works afterwards.
        await ws.send('[3, "nobody-asked", {}]')
        reply = json.loads(await ask('[2, "x5", "Heartbeat", {}]'))
        assert reply[0] == 3
        assert reply[1] == "x5"
        assert "currentTime" in reply[2]
    finally:
        await ws.close()


async def test_basic_auth_unknown_charger_and_subprotocol(
    central: CentralSystem, clock: SimClock
) -> None:
    station = SimStation("cpauth", clock, rate_unit="W")
    with pytest.raises(websockets.InvalidStatus) as err:
        async with ChargerLink(station, _url(central), password="wrong"):
            pass
    assert err.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus):
        async with ChargerLink(station, _url(central)):
            pass
    async with ChargerLink(station, _url(central), password="s3cret") as link:
        assert (await link.boot()).status == "Accepted"
    with pytest.raises(websockets.InvalidStatus) as err:
        async with ChargerLink(SimStation("stranger", clock), _url(central)):
            pass
    assert err.value.response.status_code == 404
    # No OCPP version in common: refused at the handshake.
    with pytest.raises(websockets.InvalidStatus) as err:
        await websockets.connect(f"{_url(central)}/cp1", subprotocols=["ocpp0.9"])  # type: ignore[list-item]
    assert err.value.response.status_code == 400
    assert central.chargers().get("cp1") is None or not central.chargers()["cp1"].connected


async def test_apply_skips_connectors_without_session_and_never_raises(
    central: CentralSystem, clock: SimClock
) -> None:
    central.apply({"cp1": 5_000.0, "nobody": 1.0, "cpw:7": 1.0}, valid_s=60.0)
    await central.drain()
    assert not central.last_results["cp1"].accepted
    assert central.last_results["cp1"].reason == "not connected"
    assert math.isfinite(central.port)
