"""Test support for the observability area: a fake 4-device site on the event bus, a real
Prometheus server on a loopback port, and the expressions of the dashboard and the alert rules.

The fake site publishes the same frozen events the daemon does (``CycleCompleted`` built from
the domain types), so the exporter is exercised end to end until ``essd demo`` exists; the
Prometheus helper only needs a ``host:port`` target, whatever serves it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from essd.clock import Clock
from essd.counters import DeviceCounters
from essd.credibility import CredibilityReport, MeterVerdict, UnitVerdict
from essd.domain import (
    BatteryReading,
    DeviceClass,
    DeviceState,
    FallbackRung,
    LiveLimits,
    MeterReading,
    Plan,
    PlanCause,
    Reading,
    Setpoint,
    Snapshot,
)
from essd.events import (
    CommandHandled,
    CycleCompleted,
    DaemonStatus,
    DaemonStatusChanged,
    DeviceLimits,
    DeviceRecord,
    DeviceStateChanged,
    EventBus,
    ForecastRecord,
    MqttConnectionChanged,
    SiteTotals,
    SwapStatus,
    WriteOutcome,
    WriteStatus,
)
from tests.support.net import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "observability"
DASHBOARD_DIR = OBSERVABILITY / "grafana" / "dashboards"
DASHBOARD = DASHBOARD_DIR / "essd.json"  # control-loop health
DASHBOARDS = ("essd-site.json", "essd.json", "essd-fleet.json")
ALERTS = OBSERVABILITY / "prometheus" / "alerts.yml"
ALERTS_TEST = OBSERVABILITY / "prometheus" / "alerts_test.yml"
PROMETHEUS_EXAMPLE = OBSERVABILITY / "prometheus" / "prometheus.yml"
DATASOURCE_UID = "essd-prometheus"

PHASES = ("read", "snapshot", "forecast", "decide", "guard", "write", "publish")


def program(name: str) -> str:
    """Absolute path of a system program (Debian puts some in /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make sysdeps` (Debian package)")
    return found


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    return _free_port()


def http_get(url: str, *, timeout: float = 5.0) -> bytes:
    """GET ``url`` and return the body (raises on HTTP errors)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body


def wait_for_metrics(url: str, *, timeout_s: float = 20.0) -> bytes:
    """Poll a /metrics URL until it answers with essd's build info; returns the body."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = http_get(url, timeout=1.0)
            if b"essd_build_info" in body:
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no essd metrics at {url} after {timeout_s} s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- the fake site


@dataclass(frozen=True)
class FakeDevice:
    """One storage unit of the fake site."""

    id: str
    device_class: DeviceClass
    capacity_wh: float
    max_w: float
    soc0: float


SITE_DEVICES = (
    FakeDevice("pcs1", DeviceClass.INDUSTRIAL, 215_000.0, 100_000.0, 0.55),
    FakeDevice("pcs2", DeviceClass.INDUSTRIAL, 215_000.0, 100_000.0, 0.40),
    FakeDevice("hybrid1", DeviceClass.HOUSEHOLD, 10_000.0, 5_000.0, 0.70),
    FakeDevice("portable1", DeviceClass.PORTABLE, 2_000.0, 1_200.0, 0.90),
)
METER_ID = "meter"


@dataclass
class FakeSite:
    """A 4-battery site with a meter, producing one realistic ``CycleCompleted`` per call.

    Load and PV follow smooth curves, the plan shares the residual load among the batteries,
    SoC integrates the power, totals integrate the grid, the communication counters grow, and
    every so often a solve times out (rung 3) or a Modbus request fails, so every metric and
    every dashboard panel has data. Deterministic for a given sequence of calls.
    """

    clock: Clock
    period_s: float = 1.0
    ttl_s: float = 30.0
    devices: tuple[FakeDevice, ...] = SITE_DEVICES
    import_limit_w: float = 250_000.0
    export_limit_w: float = 0.0
    cycle: int = 0
    soc: dict[str, float] = field(default_factory=dict)
    totals: SiteTotals = field(default_factory=SiteTotals)
    requests: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    mismatches: dict[str, int] = field(default_factory=dict)
    overruns: int = 0
    last_plan: Plan | None = None
    peak_w: float = 0.0

    def __post_init__(self) -> None:
        for d in self.devices:
            self.soc.setdefault(d.id, d.soc0)

    def startup_events(self) -> list[Any]:
        """What a daemon publishes on start: status, device transitions, MQTT, a command."""
        now = self.clock.now()
        events: list[Any] = [DaemonStatusChanged(DaemonStatus.STARTING, now)]
        for d in (*[dev.id for dev in self.devices], METER_ID):
            events.append(
                DeviceStateChanged(d, DeviceState.CONNECTING, DeviceState.RUNNING, "connected", now)
            )
        events += [
            DaemonStatusChanged(DaemonStatus.ONLINE, now),
            MqttConnectionChanged(connected=True, time=now),
            CommandHandled("reserve", ok=True, error="", time=now),
            CommandHandled("setpoint", ok=False, error="power_w: must be finite", time=now),
        ]
        return events

    def next_event(self) -> CycleCompleted:
        """Advance one cycle and return its event."""
        k = self.cycle
        self.cycle += 1
        mono = self.clock.monotonic()
        now = self.clock.now()
        day = 2 * math.pi * (k % 240) / 240.0  # a compressed "day" of 240 cycles
        load_w = 180_000.0 + 40_000.0 * math.sin(day)
        pv_w = max(0.0, 150_000.0 * math.sin(day - 0.5))
        import_price = 1.1 if math.sin(day) > 0.3 else 0.35
        residual = load_w - pv_w
        total_max = sum(d.max_w for d in self.devices)
        share = max(-1.0, min(1.0, residual / total_max))
        power = {d.id: round(share * d.max_w * 0.8, 1) for d in self.devices}
        for d in self.devices:
            delta_wh = power[d.id] * self.period_s / 3600.0
            self.soc[d.id] = min(0.95, max(0.10, self.soc[d.id] - delta_wh / d.capacity_wh))
        grid_w = residual - sum(power.values())
        dt_h = self.period_s / 3600.0
        imported = max(grid_w, 0.0) * dt_h
        exported = max(-grid_w, 0.0) * dt_h
        self.totals = SiteTotals(
            imported_wh=self.totals.imported_wh + imported,
            exported_wh=self.totals.exported_wh + exported,
            cost=self.totals.cost + imported / 1000.0 * import_price - exported / 1000.0 * 0.3,
            co2_kg=self.totals.co2_kg + imported / 1000.0 * 0.581,
            battery_charged_wh=self.totals.battery_charged_wh
            + sum(max(0.0, -p) for p in power.values()) * dt_h,
            battery_discharged_wh=self.totals.battery_discharged_wh
            + sum(max(0.0, p) for p in power.values()) * dt_h,
            pv_wh=self.totals.pv_wh + pv_w * dt_h,
            savings=self.totals.savings + sum(power.values()) / 1000.0 * dt_h * import_price,
        )
        self.peak_w = max(self.peak_w, grid_w)
        plan = self._plan(k, now, power, grid_w, import_price)
        self.last_plan = plan
        batteries = {}
        for d in self.devices:
            latency = (
                0.002 + 0.001 * (k % 5) + (0.02 if d.device_class is DeviceClass.PORTABLE else 0)
            )
            self.requests[d.id] = self.requests.get(d.id, 0) + 6
            self.writes[d.id] = self.writes.get(d.id, 0) + 2
            if d.device_class is DeviceClass.PORTABLE and k % 7 == 3:
                self.timeouts[d.id] = self.timeouts.get(d.id, 0) + 1
            if d.id == "pcs2" and k == 5:
                self.mismatches[d.id] = self.mismatches.get(d.id, 0) + 1
            batteries[d.id] = BatteryReading(
                device_id=d.id,
                device_class=d.device_class,
                read_at_mono=mono - latency,
                available=True,
                soc=Reading.good(self.soc[d.id], "ratio", mono - latency),
                power_w=Reading.good(power[d.id], "W", mono - latency),
                limits=LiveLimits(d.max_w, d.max_w),
                capacity_wh=d.capacity_wh,
            )
        counters = {
            d.id: DeviceCounters(
                requests_total=self.requests[d.id],
                errors_total={"timeout": self.timeouts.get(d.id, 0)},
                writes_total=self.writes[d.id],
                readback_mismatches_total=self.mismatches.get(d.id, 0),
                last_latency_s=0.002 + 0.001 * (k % 5),
            )
            for d in self.devices
        }
        counters[METER_ID] = DeviceCounters(requests_total=2 * (k + 1), last_latency_s=0.003)
        phases = {p: 0.001 * (i + 1) + 0.0005 * (k % 3) for i, p in enumerate(PHASES)}
        duration = sum(phases.values())
        overrun = k % 50 == 49
        self.overruns += int(overrun)
        return CycleCompleted(
            cycle=k,
            time=now,
            duration_s=duration,
            period_s=self.period_s,
            overrun=overrun,
            overruns_total=self.overruns,
            phase_s=phases,
            snapshot=Snapshot(
                time=now,
                mono=mono,
                batteries=batteries,
                meter=MeterReading(METER_ID, mono, Reading.good(grid_w, "W", mono)),
            ),
            plan=plan,
            setpoints={
                d.id: Setpoint(d.id, power[d.id], mono, self.ttl_s, plan.reason)
                for d in self.devices
            },
            device_states={d.id: DeviceState.RUNNING for d in self.devices}
            | {METER_ID: DeviceState.RUNNING},
            device_counters=counters,
            devices={
                d.id: DeviceRecord(
                    device_id=d.id,
                    device_class=d.device_class,
                    state=DeviceState.RUNNING,
                    reason="ok",
                    limits=DeviceLimits(0.10, 0.95, d.max_w, d.max_w),
                    requested_w=power[d.id],
                    setpoint_w=power[d.id],
                    guard_reasons=(),
                    # Writes are refreshed every third cycle: the age saw-tooths.
                    write=WriteOutcome(
                        WriteStatus.WRITTEN if k % 3 == 0 else WriteStatus.HELD,
                        power_w=power[d.id],
                        accepted_at_mono=mono - self.period_s * (k % 3),
                    ),
                    setpoint_age_s=self.period_s * (k % 3),
                )
                for d in self.devices
            },
            predicted_grid_w=grid_w,
            credibility=CredibilityReport(
                units={d.id: UnitVerdict(credible=True) for d in self.devices},
                meter=MeterVerdict(plausible=True, grid_power_w=grid_w),
                limit_margin_w=3600.0,
            ),
            grid_power_w=grid_w,
            import_limit_w=self.import_limit_w,
            export_limit_w=self.export_limit_w,
            import_price=import_price,
            export_price=0.3,
            carbon_intensity_g_per_kwh=581.0,
            totals=self.totals,
            mode="auto",
            reserve_soc=0.10,
            pv_power_w=pv_w,
            net_load_w=load_w,  # PV measured: the whole load
            billing_peak_w=self.peak_w,
            forecast=ForecastRecord(
                start=now,
                step_s=900.0,
                load_w=(load_w - pv_w,) * 8,
                pv_w=(pv_w,) * 8,
                carbon_g_per_kwh=(581.0,) * 8,
            ),
            # The site runs a swap station too, so its families are served.
            swap=SwapStatus(
                packs_ready=3, packs=8, service_level=2, swaps_total=k, demand_per_hour=2.0
            ),
        )

    def _plan(
        self, k: int, now: float, power: Mapping[str, float], grid_w: float, price: float
    ) -> Plan:
        steps = 8
        fresh = Plan(
            created_at=now,
            step_s=900.0,
            device_ids=tuple(power),
            power_w={d: (p,) * steps for d, p in power.items()},
            soc={d.id: (self.soc[d.id],) * (steps + 1) for d in self.devices},
            grid_w=(grid_w,) * steps,
            objective=120.0 + 10.0 * math.sin(k / 10.0),
            solver_status="optimal",
            rung=FallbackRung.OPTIMAL,
            reason="optimal",
            cause=PlanCause.OPTIMAL,
            solve_s=0.02 + 0.005 * (k % 4),
            import_price=(price,) * steps,
            export_price=(0.3,) * steps,
        )
        if k % 10 == 9 and self.last_plan is not None:
            shifted = self.last_plan.shifted_to(
                now,
                rung=FallbackRung.LAST_PLAN,
                reason="solver timeout after 2.01 s; last plan",
                cause=PlanCause.SOLVER_TIMEOUT,
            )
            if shifted is not None:
                return shifted
        return fresh


class SiteFeeder:
    """Publishes the fake site's events on a bus from a background thread, one per period."""

    def __init__(self, site: FakeSite, bus: EventBus, *, interval_s: float) -> None:
        self.site = site
        self.bus = bus
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-site", daemon=True)

    def _run(self) -> None:
        for ev in self.site.startup_events():
            self.bus.publish(ev)
        while not self._stop.is_set():
            self.bus.publish(self.site.next_event())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> SiteFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------- a real Prometheus


class PrometheusServer:
    """A private Prometheus (Debian's binary) on a free loopback port, scraping ``target``.

    ``target`` is ``host:port`` of any /metrics endpoint: the in-process exporter now, a
    running ``essd demo --metrics-port P`` later. Scrape and rule evaluation every second.
    """

    def __init__(
        self, target: str, workdir: Path, *, rule_files: tuple[Path, ...] = (), job: str = "essd"
    ) -> None:
        self.target = target
        self.workdir = workdir
        self.rule_files = rule_files
        self.job = job
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The generated prometheus.yml."""
        return {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }

    def start(self, *, timeout_s: float = 15.0) -> None:
        """Start the server and wait until it reports ready."""
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config()))
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    program("prometheus"),
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                http_get(f"{self.url}/-/ready", timeout=1.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout_s} s: {self.log.read_text()}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET an API path; returns the decoded JSON even for HTTP 4xx (error details)."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            body = http_get(url)
        except urllib.error.HTTPError as exc:
            body = exc.read()
        result: dict[str, Any] = json.loads(body)
        return result

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query through ``/api/v1/query``."""
        return self.api("/api/v1/query", query=expr)


@contextmanager
def running_prometheus(
    target: str, workdir: Path, *, rule_files: tuple[Path, ...] = ()
) -> Iterator[PrometheusServer]:
    """A started :class:`PrometheusServer`, stopped on exit."""
    server = PrometheusServer(target, workdir, rule_files=rule_files)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------- dashboard and rule expressions


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel."""

    panel: str
    ref_id: str
    expr: str


def dashboard(name: str = "essd.json") -> dict[str, Any]:
    """One dashboard's JSON (default: the control-loop health board)."""
    data: dict[str, Any] = json.loads((DASHBOARD_DIR / name).read_text())
    return data


def all_panels(dash: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(dash: Mapping[str, Any] | None = None) -> list[PanelQuery]:
    """Every Prometheus expression of every panel (of every dashboard when ``dash`` is None)."""
    boards = [dashboard(name) for name in DASHBOARDS] if dash is None else [dash]
    return [
        PanelQuery(f"{d['title']}: {p['title']}", t["refId"], t["expr"])
        for d in boards
        for p in all_panels(d)
        for t in p.get("targets", [])
        if "expr" in t
    ]


def expand_grafana(
    expr: str,
    *,
    rate_interval: str = "10s",
    device: str = ".*",
    instance: str = ".*",
    range_: str = "1h",
) -> str:
    """Replace the Grafana variables the dashboards use with values Prometheus accepts
    (``$__range``: the panel's time range, "today so far" for the daily figures)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", range_)
        .replace("${device:regex}", device)
        .replace("$device", device)
        .replace("$instance", instance)
    )


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]
