"""sd_notify on a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from essd.sdnotify import SystemdNotifier, notify_address, watchdog_timeout_from_environment
from tests.support.systemd import NotifyListener, service_invocation

# Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="essd-") as d:
        yield Path(d)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[NotifyListener]:
    with NotifyListener(short_dir, abstract=request.param == "abstract") as lst:
        yield lst


def test_messages_arrive_in_order_with_their_fields(listener: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "30000000"}
    with SystemdNotifier.from_environment(env) as notifier:
        assert notifier.enabled
        assert notifier.ready(status="running: 4 devices")
        assert notifier.watchdog()
        assert notifier.status("rung 1 optimal, solve 12 ms")
        assert notifier.stopping(status="writing safe mode")
    got = [listener.receive(1.0) for _ in range(4)]
    assert [n.fields if n else None for n in got] == [
        {"READY": "1", "STATUS": "running: 4 devices"},
        {"WATCHDOG": "1"},
        {"STATUS": "rung 1 optimal, solve 12 ms"},
        {"STOPPING": "1", "STATUS": "writing safe mode"},
    ]


def test_abstract_address_maps_at_sign_to_nul() -> None:
    assert notify_address("@essd/notify") == "\0essd/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        notify_address("relative/path")
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        notify_address("@")


def test_no_socket_means_every_call_is_a_quiet_no_op(caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None  # no watchdog without a socket to ping
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert caplog.records == []


def test_invalid_socket_value_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="essd.sdnotify"):
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "not-absolute"})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected_interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    short_dir: Path, env: dict[str, str], expected_interval: float | None
) -> None:
    with NotifyListener(short_dir) as lst:
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": lst.address, **env})
        assert notifier.watchdog_interval_s == expected_interval
        # Without a watchdog for us, watchdog() sends nothing.
        assert notifier.watchdog() is (expected_interval is not None)
        assert (lst.receive(0.2) is not None) is (expected_interval is not None)


def test_watchdog_timeout_parsing_names_the_variable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="essd.sdnotify"):
        assert watchdog_timeout_from_environment({"WATCHDOG_USEC": "1.5"}, pid=1) is None
    assert "WATCHDOG_USEC" in caplog.text


def test_status_text_stays_on_one_line(listener: NotifyListener) -> None:
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.address})
    notifier.status("device bat1 stale\nREADY=1\n" + "x" * 1000)
    note = listener.receive(1.0)
    assert note is not None
    assert set(note.fields) == {"STATUS"}  # an injected READY=1 line did not get through
    assert note.fields["STATUS"].startswith("device bat1 stale READY=1 x")
    assert len(note.fields["STATUS"]) == 400


def test_unset_environment_hides_the_socket_from_children(short_dir: Path) -> None:
    with NotifyListener(short_dir) as lst:
        env = {"NOTIFY_SOCKET": lst.address, "WATCHDOG_USEC": "20000000", "PATH": "/bin"}
        notifier = SystemdNotifier.from_environment(env, unset_environment=True)
        assert env == {"PATH": "/bin"}
        assert notifier.watchdog_interval_s == 10.0
        assert notifier.ready()


def test_timeouts_can_be_changed_at_run_time(listener: NotifyListener) -> None:
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "30000000"}
    )
    assert notifier.set_watchdog_timeout(900.0)
    assert notifier.watchdog_interval_s == 450.0
    assert notifier.extend_timeout(12.5)
    got = [listener.receive(1.0) for _ in range(2)]
    assert [n.fields if n else None for n in got] == [
        {"WATCHDOG_USEC": "900000000"},
        {"EXTEND_TIMEOUT_USEC": "12500000"},
    ]
    with pytest.raises(ValueError, match="seconds"):
        notifier.extend_timeout(0)
    without = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.address})
    assert not without.set_watchdog_timeout(60.0)  # no watchdog configured: nothing to change


def test_send_failures_never_raise_and_are_logged_once_then_recovery_once(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_dir / "notify.sock"
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.INFO, logger="essd.sdnotify"):
        # Nobody listens yet (systemd restarting, say): every send fails quietly.
        assert [notifier.status(f"cycle {i}") for i in range(5)] == [False] * 5
        with NotifyListener(short_dir) as lst:
            assert notifier.status("back")
            note = lst.receive(1.0)
            assert note is not None
            assert note.fields == {"STATUS": "back"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "failed" in messages[0]
    assert "work again" in messages[1]


def test_a_full_receiver_queue_drops_messages_instead_of_blocking(short_dir: Path) -> None:
    # systemd reads its notify socket promptly; if it ever does not, a blocking send would
    # stall the control cycle. The kernel queues a few hundred datagrams, then refuses.
    with NotifyListener(short_dir) as lst:
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": lst.address})
        results = [notifier.status(f"cycle {i}") for i in range(5000)]
        assert results[0]
        assert not all(results)
        assert lst.receive(1.0) is not None  # what was queued is still delivered


CHILD = r"""
import signal, sys, time
from essd.sdnotify import SystemdNotifier

notifier = SystemdNotifier.from_environment()
interval = notifier.watchdog_interval_s
stop = False
def on_term(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
notifier.ready(status=f"interval {interval}")
while not stop:
    notifier.watchdog()
    time.sleep(interval)
notifier.stopping()
"""


def test_a_service_process_sees_its_watchdog_as_systemd_sets_it(short_dir: Path) -> None:
    """The environment systemd gives essd.service's main process, WATCHDOG_PID included."""
    with NotifyListener(short_dir) as lst:
        cmd, env = service_invocation([sys.executable, "-c", CHILD], lst, watchdog_s=0.2)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        assert env["PYTHONFAULTHANDLER"] == "1"  # the unit's Environment= lines are applied
        proc = subprocess.Popen(cmd, env=env)
        try:
            ready = lst.wait_for("READY", timeout=20.0)
            assert ready.fields["STATUS"] == "interval 0.1"
            pings = [lst.wait_for("WATCHDOG", timeout=2.0).at for _ in range(6)]
            mean_gap = (pings[-1] - pings[0]) / (len(pings) - 1)
            # Half of 200 ms, give or take scheduling on a busy machine.
            assert 0.05 < mean_gap < 0.2, pings
            proc.send_signal(signal.SIGTERM)
            lst.wait_for("STOPPING", timeout=5.0)
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
            proc.wait()


def test_a_child_of_the_service_does_not_inherit_the_watchdog(short_dir: Path) -> None:
    """WATCHDOG_PID names the main process: a process it starts must not ping in its name."""
    probe = (
        "from essd.sdnotify import SystemdNotifier as N;"
        " print(N.from_environment().watchdog_interval_s)"
    )
    with NotifyListener(short_dir) as lst:
        cmd, env = service_invocation(
            [
                sys.executable,
                "-c",
                f"import subprocess, sys; subprocess.run([sys.executable, '-c', {probe!r}])",
            ],
            lst,
            watchdog_s=10.0,
        )
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "None"
