"""Hostile frames at the OCPP central system over a real WebSocket: whatever a charger sends,
the connection keeps answering (with an OCPP error where one is due) and the server keeps
running. Frames are drawn by hypothesis: random bytes and text, random JSON, and valid
messages mutated (wrong types, unknown fields, every known action)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from essd.clock import SimClock
from essd.config_ev import ChargerConfig, OcppConfig
from essd.ocpp import CentralSystem

T0 = 1_767_225_600.0

ACTIONS_16 = [
    "BootNotification", "Heartbeat", "StatusNotification", "MeterValues", "StartTransaction",
    "StopTransaction", "Authorize", "DataTransfer", "FirmwareStatusNotification", "Nonsense",
]  # fmt: skip

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
calls = st.builds(
    lambda uid, action, payload: json.dumps([2, uid, action, payload]),
    st.text(min_size=1, max_size=10).filter(lambda u: u != "hb"),
    st.sampled_from(ACTIONS_16),
    st.dictionaries(
        st.sampled_from(["connectorId", "meterValue", "idTag", "status", "errorCode", "x"]),
        json_values,
        max_size=4,
    ),
)
frames = st.one_of(
    st.text(max_size=60),
    json_values.map(json.dumps),
    st.lists(json_values, max_size=5).map(json.dumps),
    calls,
)


async def _round(url: str, frame: str) -> list[Any]:
    async with websockets.connect(url, subprotocols=["ocpp1.6"]) as ws:  # type: ignore[list-item]
        await ws.send(frame)
        replies = []
        # At most one reply to the frame, then the heartbeat's answer.
        await ws.send('[2, "hb", "Heartbeat", {}]')
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
            replies.append(msg)
            if msg[1] == "hb":
                return replies


@pytest.fixture(scope="module")
def central_url() -> Any:
    loop = asyncio.new_event_loop()
    cs = CentralSystem(OcppConfig(port=0), [ChargerConfig(id="cp1")], clock=SimClock(T0))
    loop.run_until_complete(cs.start())
    yield loop, f"ws://127.0.0.1:{cs.port}/cp1"
    loop.run_until_complete(cs.stop())
    loop.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frame=frames)
def test_any_frame_is_answered_or_dropped_and_the_connection_lives(
    central_url: tuple[asyncio.AbstractEventLoop, str], frame: str
) -> None:
    loop, url = central_url
    replies = loop.run_until_complete(_round(url, frame))
    heartbeat = replies[-1]
    assert heartbeat[0] == 3, replies  # the connection still answers
    assert "currentTime" in heartbeat[2]
    for reply in replies[:-1]:
        # Anything else it sent is a well-formed OCPP answer: a result or an error with a code.
        assert reply[0] in (3, 4), reply
        if reply[0] == 4:
            assert isinstance(reply[2], str), reply
            assert reply[2], reply
