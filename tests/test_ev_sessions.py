"""EV session requests (cmd/session, HA entities), learned departures, the session book that
turns plugged vehicles into LP sessions, and the per-charger limits taken from a plan."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import jinja2
import pytest

from essd.command_handling import handle_command
from essd.dispatch.sessions import FlexSession
from essd.domain import FallbackRung, Plan, PlanCause
from essd.flexloads import (
    DepartureLearner,
    PluggedVehicle,
    SessionBook,
    SessionRequest,
    charge_limits_w,
)
from essd.mqtt import Topics, discovery_messages
from tests.support.mqtt import T0, RecordingTarget

NOW = T0 + 3600.0


def _send(payload: dict[str, Any], target: Any = None) -> tuple[bool, str, RecordingTarget]:
    target = RecordingTarget() if target is None else target
    result = handle_command("session", json.dumps(payload).encode(), target, now=NOW)
    return result.ok, result.error, target


def test_session_command_reaches_the_target() -> None:
    ok, _, target = _send({"charger": "cp1", "departure": T0 + 8 * 3600, "energy_wh": 18000})
    assert ok
    assert target.calls == [("session", ("cp1", T0 + 8 * 3600, 18000.0, None, None))]
    ok, _, target = _send(
        {
            "charger": "cp1",
            "target_soc": 0.8,
            "capacity_wh": 60000,
            "departure": "2026-01-01T10:00:00+08:00",
        }
    )
    assert ok
    assert target.calls == [("session", ("cp1", T0 + 7200.0, None, 0.8, 60000.0))]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"charger": "cp1"}, "payload: departure: give departure"),
        (
            {"charger": "cp1", "energy_wh": 1, "target_soc": 0.5, "capacity_wh": 1},
            "payload: target_soc",
        ),
        ({"charger": "cp1", "target_soc": 0.5}, "payload: capacity_wh"),
        ({"charger": "cp1", "energy_wh": -1}, "energy_wh: "),
        ({"charger": "cp 1", "energy_wh": 1}, "charger: "),
        ({"charger": "cp1", "departure": T0}, "departure: already in the past"),
        ({"charger": "cp1", "departure": NOW + 8 * 86400}, "departure: more than"),
        ({"charger": "cp9", "energy_wh": 1000}, "charger: unknown charger"),
    ],
)
def test_bad_session_requests_are_refused_naming_the_field(
    payload: dict[str, Any], error: str
) -> None:
    ok, got, target = _send(payload)
    assert not ok
    assert got.startswith(error), got
    assert target.calls == []


@dataclass
class _NoChargers:
    calls: list[Any] = field(default_factory=list)

    def set_mode(self, mode: str) -> None:
        self.calls.append(mode)

    def set_reserve(self, reserve_soc: float) -> None:
        self.calls.append(reserve_soc)

    def set_manual_setpoint(self, device_id: str, power_w: float, expires_at: float) -> None:
        self.calls.append(device_id)

    def set_price_override(self, *args: Any) -> None:
        self.calls.append(args)

    def set_forecast_override(self, *args: Any) -> None:
        self.calls.append(args)


def test_site_without_chargers_refuses_session_requests() -> None:
    ok, error, _ = _send({"charger": "cp1", "energy_wh": 1000}, _NoChargers())
    assert not ok
    assert error == "command: this site has no chargers"


def test_ha_entities_for_a_charger_send_valid_session_commands() -> None:
    topics = Topics("essd/site-a", "homeassistant", "site-a")
    messages = dict(discovery_messages(topics, [], charger_ids=["cp1"]))
    energy = json.loads(messages["homeassistant/number/essd_site_a/cp1_session_energy/config"])
    departure = json.loads(messages["homeassistant/text/essd_site_a/cp1_session_departure/config"])
    assert energy["command_topic"] == departure["command_topic"] == "essd/site-a/cmd/session"
    env = jinja2.Environment(autoescape=False)
    sent = env.from_string(energy["command_template"]).render(value="18.5")
    ok, _, target = _send(json.loads(sent))
    assert ok
    assert target.calls == [("session", ("cp1", None, 18500.0, None, None))]
    sent = env.from_string(departure["command_template"]).render(value="2026-01-01T07:30:00Z")
    ok, _, target = _send(json.loads(sent))
    assert ok
    assert target.calls == [("session", ("cp1", T0 + 7.5 * 3600, None, None, None))]


def test_departure_learner_per_charger_and_arrival_hour() -> None:
    learner = DepartureLearner(weight=0.5)
    assert learner.predict("cp1", T0 + 8 * 3600) is None
    learner.observe("cp1", T0 + 8 * 3600, T0 + 17 * 3600)  # 9 h from 08:00
    learner.observe("cp1", T0 + 86400 + 8 * 3600, T0 + 86400 + 16 * 3600)  # 8 h
    learner.observe("cp1", T0 + 18 * 3600, T0 + 31 * 3600)  # 13 h from 18:00
    learner.observe("cp1", T0, T0 + 10.0)  # a blip is not a stay
    assert learner.predict("cp1", T0 + 2 * 86400 + 8.5 * 3600) == pytest.approx(8.5 * 3600)
    assert learner.predict("cp1", T0 + 18 * 3600) == pytest.approx(13 * 3600)
    # An hour never seen: the mean over the hours seen.
    assert learner.predict("cp1", T0 + 3 * 3600) == pytest.approx((8.5 + 13) / 2 * 3600)
    assert learner.predict("cp2", T0) is None


def _vehicle(**kw: Any) -> PluggedVehicle:
    base: dict[str, Any] = {
        "charger_id": "cp1",
        "session_id": "7",
        "plugged_at": T0 + 3000.0,
        "delivered_wh": 2000.0,
        "max_power_w": 11_000.0,
        "min_power_w": 4140.0,
        "default_energy_wh": 20_000.0,
        "default_dwell_s": 8 * 3600.0,
    }
    return PluggedVehicle(**(base | kw))


def test_session_book_uses_request_then_learned_then_default() -> None:
    book = SessionBook()
    (s,) = book.sessions([_vehicle()], NOW)
    assert s.id == "cp1/7"
    assert s.departure_s == T0 + 3000.0 + 8 * 3600.0
    assert s.energy_needed_wh == pytest.approx(20_000.0 - 2000.0 * 0.92)
    book.request(SessionRequest("cp1", departure_s=NOW + 3600.0, energy_wh=10_000.0))
    (s,) = book.sessions([_vehicle()], NOW)
    assert s.departure_s == NOW + 3600.0
    assert s.energy_needed_wh == pytest.approx(10_000.0 - 2000.0 * 0.92)
    book.request(SessionRequest("cp1", target_soc=0.8, capacity_wh=50_000.0))
    (s,) = book.sessions([_vehicle(soc=0.5)], NOW)
    assert s.energy_needed_wh == pytest.approx(0.3 * 50_000.0)
    # The vehicle leaves: the stay is learned and the request ends with the session.
    assert book.sessions([], T0 + 3000.0 + 5 * 3600.0) == []
    assert book.requests == {}
    (s,) = book.sessions([_vehicle(session_id="8", plugged_at=T0 + 86400 + 3000.0)], NOW + 86400)
    assert s.departure_s == pytest.approx(T0 + 86400 + 3000.0 + 5 * 3600.0)


def test_charge_limits_from_the_plan_round_below_minimum_to_zero() -> None:
    sessions = [
        FlexSession("cp1/7", "cp1", T0, T0 + 3600, 1000.0, 11_000.0, min_power_w=4140.0),
        FlexSession("cp2/3", "cp2", T0, T0 + 3600, 1000.0, 11_000.0, min_power_w=4140.0),
        FlexSession("cp3/1", "cp3", T0, T0 + 3600, 1000.0, 11_000.0),
    ]
    plan = Plan(
        created_at=T0,
        step_s=900.0,
        device_ids=(),
        power_w={},
        soc={},
        grid_w=(0.0,),
        objective=0.0,
        solver_status="optimal",
        rung=FallbackRung.OPTIMAL,
        reason="",
        cause=PlanCause.OPTIMAL,
        session_power_w={"cp1/7": (-6000.0,), "cp2/3": (-3000.0,)},
    )
    limits = charge_limits_w(plan, sessions)
    assert limits == {"cp1": 6000.0, "cp2": 0.0}, "cp3 has no plan: no limit is sent"
    assert all(math.isfinite(v) for v in limits.values())


def test_charge_limit_below_minimum_rounds_up_only_within_the_headroom() -> None:
    s = FlexSession("cp1/7", "cp1", T0, T0 + 3600, 1000.0, 11_000.0, min_power_w=4140.0)
    plan = Plan(
        created_at=T0,
        step_s=900.0,
        device_ids=(),
        power_w={},
        soc={},
        grid_w=(0.0,),
        objective=0.0,
        solver_status="optimal",
        rung=FallbackRung.OPTIMAL,
        reason="",
        cause=PlanCause.OPTIMAL,
        session_power_w={"cp1/7": (-3000.0,)},
    )
    assert charge_limits_w(plan, [s], headroom_w=1200.0) == {"cp1": 4140.0}
    assert charge_limits_w(plan, [s], headroom_w=1000.0) == {"cp1": 0.0}


def test_learned_departures_survive_as_state_and_bad_state_names_the_field() -> None:
    learner = DepartureLearner()
    learner.observe("cp1", T0 + 8 * 3600, T0 + 17 * 3600)
    again = DepartureLearner.from_state(json.loads(json.dumps(learner.state())))
    assert again.predict("cp1", T0 + 86400 + 8 * 3600) == 9 * 3600
    assert DepartureLearner.from_state(None).dwell_s == {}
    for bad, name in [
        ([], "departures"),
        ({"cp1": 5}, "departures.cp1"),
        ({"cp1": {"25": 3600}}, "departures.cp1.25"),
        ({"cp1": {"8": 1e9}}, "departures.cp1.8"),
        ({"cp1": {"8": True}}, "departures.cp1.8"),
    ]:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            DepartureLearner.from_state(bad)


class _Port:
    """A ChargerPort with fixed vehicles that records what it is told (not a mock: the
    protocol is two methods)."""

    def __init__(self, vehicles: list[PluggedVehicle]) -> None:
        self.vehicles = vehicles
        self.sent: list[dict[str, float]] = []

    def plugged(self) -> list[PluggedVehicle]:
        return self.vehicles

    def apply(self, limits_w: dict[str, float], *, valid_s: float) -> None:
        self.sent.append(dict(limits_w))


def test_flexloads_more_vehicles_than_columns_pauses_the_rest() -> None:
    from essd.config_ev import ChargerConfig  # noqa: PLC0415
    from essd.flexloads import FlexLoads  # noqa: PLC0415

    assert ChargerConfig(id="cp", connectors=2).connector_ids == ("cp", "cp:2")
    port = _Port([_vehicle(charger_id="cp"), _vehicle(charger_id="cp:2", session_id="8")])
    flex = FlexLoads(port, ["cp"], import_limit_w=20_000.0, profile_validity_s=120.0)
    (session,) = flex.sessions(NOW)
    plan = Plan(
        created_at=NOW,
        step_s=900.0,
        device_ids=(),
        power_w={},
        soc={},
        grid_w=(6000.0,),
        objective=0.0,
        solver_status="optimal",
        rung=FallbackRung.OPTIMAL,
        reason="",
        cause=PlanCause.OPTIMAL,
        session_power_w={session.id: (-5000.0,)},
    )
    assert flex.apply(plan, 1000.0) == {"cp": 5000.0, "cp:2": 0.0}
    assert port.sent == [{"cp": 5000.0, "cp:2": 0.0}]
    # No meter: everything pauses.
    assert flex.apply(plan, None) == {"cp": 0.0, "cp:2": 0.0}
    with pytest.raises(ValueError, match="charger: unknown charger 'cp:2'"):
        flex.request("cp:2", None, 1000.0, None, None)
