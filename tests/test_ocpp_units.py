"""Pieces of the OCPP central system and the charger link without a network: meter values of
both versions, limits in the charger's unit, configuration errors, limits to the chargers;
and the central system over TLS (wss://)."""

from __future__ import annotations

import math
import ssl
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from essd.clock import SimClock
from essd.config_ev import ChargerConfig, OcppConfig
from essd.dispatch.sessions import FlexSession
from essd.flexloads import clamp_to_headroom, fallback_limits_w
from essd.ocpp import CentralSystem, RateUnit
from essd.ocpp.common import schedule_limit
from essd.ocpp.registry import parse_meter_values
from hil_sim.chargers import ChargerLink, SimStation, SimVehicle

T0 = 1_767_225_600.0


def test_meter_values_16_with_units_phases_and_garbage() -> None:
    entry = {
        "timestamp": "2026-01-01T00:01:00Z",
        "sampled_value": [
            {"value": "7.2", "measurand": "Power.Active.Import", "unit": "kW"},
            {"value": "1234.5", "unit": "kWh"},  # the default measurand: the energy register
            {"value": "16.1", "measurand": "Current.Import", "unit": "A", "phase": "L1"},
            {"value": "15.9", "measurand": "Current.Import", "unit": "A", "phase": "L2"},
            {"value": "55", "measurand": "SoC", "unit": "Percent"},
            {"value": "oops", "measurand": "Voltage", "unit": "V"},
            {"value": "3", "measurand": "Temperature", "unit": "Celsius"},
            "not a sampled value",
        ],
    }
    m = parse_meter_values([entry], T0, None)
    assert m.at == T0 + 60.0
    assert m.power_w == pytest.approx(7200.0)
    assert m.energy_wh == pytest.approx(1_234_500.0)
    assert m.current_a == pytest.approx(16.1)
    assert m.soc == pytest.approx(0.55)
    assert math.isnan(m.voltage_v)
    # Fields not reported keep their previous values.
    later = parse_meter_values(
        [{"sampled_value": [{"value": "5000", "measurand": "Power.Active.Import"}]}], T0 + 120, m
    )
    assert later.power_w == 5000.0
    assert later.energy_wh == m.energy_wh


def test_meter_values_201_multiplier_and_phase_power() -> None:
    per_phase = [
        {
            "value": 2.0,
            "measurand": "Power.Active.Import",
            "phase": phase,
            "unit_of_measure": {"unit": "W", "multiplier": 3},
        }
        for phase in ("L1", "L2", "L3")
    ]
    m = parse_meter_values([{"timestamp": "bad", "sampled_value": per_phase}], T0, None)
    assert m.power_w == pytest.approx(6000.0), "per-phase power is summed"
    assert m.at == T0, "an unreadable timestamp is now"
    total = [*per_phase, {"value": 5900, "measurand": "Power.Active.Import"}]
    assert parse_meter_values([{"sampled_value": total}], T0, None).power_w == 5900.0
    assert parse_meter_values("nonsense", T0, None).at == T0


def test_schedule_limit_in_the_declared_unit() -> None:
    amps = ChargerConfig(id="a", rate_unit="A", phases=3, voltage_v=230.0)
    unit, limit, phases = schedule_limit(amps, 7000.0)
    assert (unit, phases) == (RateUnit.AMPS, 3)
    assert limit == 10.1  # 10.14 A rounded down: never above the power asked for
    assert schedule_limit(ChargerConfig(id="w", rate_unit="W"), 7000.4)[1] == 7000.4
    assert schedule_limit(amps, -5.0)[1] == 0.0


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (ChargerConfig, {"id": "a", "min_power_w": 9000, "max_power_w": 7000}, "min_power_w"),
        (ChargerConfig, {"id": "bad id"}, "id"),
        (ChargerConfig, {"id": "a", "phases": 4}, "phases"),
        (OcppConfig, {"cert_file": "/x.pem"}, "key_file"),
        (OcppConfig, {"profile_validity_s": 5}, "profile_validity_s"),
        (OcppConfig, {"protocols": ["ocpp1.5"]}, "protocols"),
    ],
)
def test_config_errors_name_the_field(model: type, data: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        model.model_validate(data)


def _s(cid: str, need: float = 1000.0, min_w: float = 0.0) -> FlexSession:
    return FlexSession(f"{cid}/1", cid, T0, T0 + 3600, need, 11_000.0, min_power_w=min_w)


def test_clamp_and_fallback_keep_the_headroom() -> None:
    sessions = [_s("a", min_w=4000.0), _s("b")]
    assert clamp_to_headroom({"a": 6000.0, "b": 6000.0}, sessions, 20_000.0) == {
        "a": 6000.0,
        "b": 6000.0,
    }
    # Scaled to 9 kW: a gets 4.5 kW (above its minimum), b 4.5 kW.
    assert clamp_to_headroom({"a": 6000.0, "b": 6000.0}, sessions, 9000.0) == {
        "a": 4500.0,
        "b": 4500.0,
    }
    # Scaled to 6 kW: a's 3 kW is below its minimum and pauses.
    clamped = clamp_to_headroom({"a": 6000.0, "b": 6000.0}, sessions, 6000.0)
    assert clamped == {"a": 0.0, "b": 3000.0}
    assert clamp_to_headroom({"a": 6000.0}, sessions, -100.0) == {"a": 0.0}
    assert fallback_limits_w(sessions, 10_000.0) == {"a": 5000.0, "b": 5000.0}
    assert fallback_limits_w([*sessions, _s("c", need=0.0)], 6000.0) == {
        "a": 0.0,  # 2 kW is below a's minimum
        "b": 2000.0,
        "c": 0.0,  # needs nothing
    }


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cs.pem", tmp_path / "cs.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_central_system_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    clock = SimClock(T0)
    config = OcppConfig(port=0, cert_file=cert, key_file=key)
    chargers = [ChargerConfig(id="cp1", rate_unit="W")]
    trusted = ssl.create_default_context(cafile=str(cert))
    async with CentralSystem(config, chargers, clock=clock) as central:
        station = SimStation("cp1", clock, rate_unit="W")
        url = f"wss://127.0.0.1:{central.port}"
        async with ChargerLink(station, url, ssl_context=trusted) as link:
            assert (await link.boot()).status == "Accepted"
            await link.plug_in(1, SimVehicle(capacity_wh=50_000.0, energy_wh=10_000.0))
            assert (await central.set_limit("cp1", 1, 3000.0)).accepted
            assert station.limit_w(1) == 3000.0
        # A client that does not trust the certificate does not get in.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with ChargerLink(station, url, ssl_context=ssl.create_default_context()):
                pass


def test_site_check_names_charger_problems() -> None:
    from essd.config import Settings  # noqa: PLC0415 - only this test needs a whole site
    from essd.sitecheck import validate_site  # noqa: PLC0415

    base = {
        "site": {
            "id": "s",
            "timezone": "UTC",
            "grid_import_limit_w": 9000,
            "grid_export_limit_w": 0,
        },
        "tariff": {"currency": "CNY", "import_price_per_kwh": 0.6},
        "metrics": {"enabled": False},
    }
    twice = Settings.model_validate({**base, "ocpp": {}, "chargers": [{"id": "a"}, {"id": "a"}]})
    check = validate_site(twice, "essd.toml")
    assert "essd.toml: chargers.1.id: duplicate charger id 'a'" in check.problems
    assert any("ocpp: no grid meter" in w for w in check.warnings)
    alone = Settings.model_validate({**base, "chargers": [{"id": "a"}]})
    assert any("no [ocpp] section" in w for w in validate_site(alone, "x").warnings)
