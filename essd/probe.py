"""``essd probe``: read a real device through a profile once, before going live.

It connects to one unit, reads every register of the profile once (register by register, so
one refused address does not hide the others), prints a table (name, address, raw, decoded
value with unit, valid or why not), and checks plausibility: every mapped field valid, SoC in
0..100 %, battery power within the rating, scale factors within -10..10, no state or alarm
register reporting a fault. It writes nothing unless ``--write-test`` is given: then, after a
confirmation, a small charge / idle / discharge / idle cycle with read-back, and idle (safe
mode) on every way out.

The command line (arguments, exit codes) is :mod:`essd.probe_cli`.

Battery power in W: > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from drivers.api import CommunicationError, DeviceError, DeviceExceptionResponse
from drivers.layout import (
    Decoded,
    base_unit,
    classify_states,
    decode_register,
    register_words,
    to_base,
)
from drivers.modbus import EndpointTarget, Framing, ModbusEndpoint, SerialTarget, TcpTarget
from drivers.profile import Profile, RegisterSpec
from drivers.profile_parts import Severity

# A reading may exceed the nameplate rating by this much before it counts as implausible
# (inverters briefly overshoot; a wrong scale is off by 10x or more).
RATING_MARGIN = 1.25


class TransportError(ValueError):
    """A ``--transport`` that is not one of the three forms."""


def parse_transport(text: str) -> EndpointTarget:
    """``tcp://HOST:PORT``, ``rtu-over-tcp://HOST:PORT`` or
    ``rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1`` as an endpoint target."""
    url = urlsplit(text)
    # `essd sim` prints modbus-tcp:// and modbus-rtu-over-tcp://: the same endpoints.
    url = url._replace(scheme=url.scheme.removeprefix("modbus-"))
    if url.scheme in ("tcp", "rtu-over-tcp"):
        try:
            port = url.port
        except ValueError:
            port = None
        if not url.hostname or port is None:
            raise TransportError(f"--transport: {text!r}: needs {url.scheme}://HOST:PORT")
        framing = Framing.SOCKET if url.scheme == "tcp" else Framing.RTU
        return TcpTarget(url.hostname, port, framing)
    if url.scheme == "rtu":
        if not url.path:
            raise TransportError(f"--transport: {text!r}: needs rtu:///dev/ttyX?baud=9600")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        unknown = set(query) - {"baud", "parity", "stopbits"}
        if unknown:
            raise TransportError(f"--transport: unknown option(s) {', '.join(sorted(unknown))}")
        try:
            baud = int(query.get("baud", "9600"))
            stopbits = int(query.get("stopbits", "1"))
        except ValueError:
            raise TransportError(f"--transport: {text!r}: baud and stopbits are numbers") from None
        parity = query.get("parity", "N").upper()
        if parity not in ("N", "E", "O") or stopbits not in (1, 2) or baud <= 0:
            raise TransportError(f"--transport: {text!r}: parity N/E/O, stopbits 1/2, baud > 0")
        return SerialTarget(url.path, baud, parity, stopbits)  # type: ignore[arg-type]
    raise TransportError(
        f"--transport: {text!r}: use tcp://HOST:PORT, rtu-over-tcp://HOST:PORT or "
        "rtu:///dev/ttyUSB0?baud=9600&parity=N"
    )


@dataclass
class Row:
    """One register as read: where, raw, decoded value in base units, and why not valid."""

    name: str
    where: str
    raw: str
    value: float | str | None
    unit: str
    problem: str = ""
    states: tuple[str, ...] = ()

    def cells(self) -> tuple[str, str, str, str, str]:
        """The table's cells."""
        if isinstance(self.value, float):
            shown = f"{self.value:.6g} {self.unit}".rstrip()
        else:
            shown = "" if self.value is None else str(self.value)
        status = self.problem or "ok"
        if self.states:
            status += " | " + "; ".join(self.states)
        return self.name, self.where, self.raw, shown, status


@dataclass
class Report:
    """What a probe found: the table and the failed checks."""

    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _raw_text(raw: int | float | str | None, words: int) -> str:
    if isinstance(raw, int):
        return f"0x{raw % (1 << (16 * words)):0{4 * words}X}"
    return "" if raw is None else str(raw)


def _row(spec: RegisterSpec, decoded: Decoded, words: int) -> Row:
    value: float | str | None = decoded.value
    if isinstance(value, float):
        value = to_base(value, spec.unit)
    row = Row(
        spec.name,
        f"{spec.table.value} {spec.address}",
        _raw_text(decoded.raw, words),
        value,
        base_unit(spec.unit),
        decoded.reason,
    )
    if decoded.valid and isinstance(decoded.raw, int):
        row.states = tuple(
            f"{f.name} ({f.severity.value})" for f in classify_states(spec, decoded.raw, words)
        )
    return row


async def _read_plain(profile: Profile, endpoint: ModbusEndpoint, unit: int) -> list[Row]:
    """Every register of a plain profile, one request each."""
    words_of: dict[str, list[int]] = {}
    refused: dict[str, str] = {}
    for spec in profile.registers:
        assert spec.address is not None
        try:
            words_of[spec.name] = await endpoint.read_registers(
                spec.table, spec.address, register_words(spec), unit
            )
        except DeviceExceptionResponse as exc:
            refused[spec.name] = f"refused: {exc}"
    rows = []
    for spec in profile.registers:
        if spec.name in refused:
            where = f"{spec.table.value} {spec.address}"
            rows.append(Row(spec.name, where, "", None, "", refused[spec.name]))
            continue
        sf: int | None = None
        if spec.scale_factor is not None:
            sf_words = words_of.get(spec.scale_factor)
            sf_spec = profile.register(spec.scale_factor)
            if sf_words is not None:
                d = decode_register(sf_spec, sf_words, transport=profile.transport)
                sf = d.raw if d.valid and isinstance(d.raw, int) else None
        decoded = decode_register(spec, words_of[spec.name], transport=profile.transport, sf=sf)
        rows.append(_row(spec, decoded, register_words(spec)))
    return rows


async def _read_sunspec(profile: Profile, driver: object) -> list[Row]:
    """Every point of a SunSpec profile, located by discovery (one block per model)."""
    values = await driver.read_points()  # type: ignore[attr-defined]
    rows = []
    for spec in profile.registers:
        pv = values.get(spec.name)
        if pv is None:
            rows.append(Row(spec.name, f"point {spec.point}", "", None, "", "not read"))
            continue
        value: float | str | None = pv.value
        problem = pv.reason
        if isinstance(value, int | float):
            physical = float(value) * spec.scale + spec.offset
            if (spec.min is not None and physical < spec.min) or (
                spec.max is not None and physical > spec.max
            ):
                problem = f"{physical:g} {spec.unit} outside [{spec.min}, {spec.max}]".strip()
                value = None
            else:
                value = to_base(physical, spec.unit)
        raw = _raw_text(pv.raw, 2)
        row = Row(spec.name, f"point {spec.point}", raw, value, base_unit(spec.unit), problem)
        if isinstance(pv.raw, int) and value is not None:
            row.states = tuple(
                f"{f.name} ({f.severity.value})" for f in classify_states(spec, pv.raw, 4)
            )
        rows.append(row)
    return rows


def check(profile: Profile, rows: list[Row]) -> list[str]:
    """The plausibility checks: each failure names the register and says why."""
    by_name = {r.name: r for r in rows}
    field_of = {reg: f for f, reg in profile.fields.items()}
    out: list[str] = []
    for row in rows:
        spec = profile.register(row.name)
        mapped = row.name in field_of
        if row.problem and (mapped or spec.access != "r"):
            out.append(f"{row.name}: {row.problem}")
        if spec.scale_factor is not None and row.problem.startswith("scale factor"):
            continue
        faults = [s for s in row.states if s.endswith(f"({Severity.FAULT.value})")]
        if faults:
            out.append(f"{row.name}: the device reports {', '.join(faults)}")
    for sf_name in {s.scale_factor for s in profile.registers if s.scale_factor}:
        sf_row = by_name.get(sf_name)
        if sf_row is not None and isinstance(sf_row.value, float) and not -10 <= sf_row.value <= 10:
            out.append(f"{sf_name}: scale factor {sf_row.value:g} outside -10..10")
    rating = max(profile.ratings.max_charge_w, profile.ratings.max_discharge_w)
    power_fields = {"power_w"} | {s.power_w for s in profile.batteries}
    for fname, reg in profile.fields.items():
        found = by_name.get(reg)
        if found is None or not isinstance(found.value, float):
            continue
        value = found.value
        is_soc = fname in ("soc", "min_soc", "max_soc") or fname.endswith("_soc")
        if is_soc and not 0.0 <= value <= 1.0:
            out.append(f"{reg}: SoC {value:.1%} outside 0..100 %")
        if fname in power_fields and rating > 0 and abs(value) > RATING_MARGIN * rating:
            out.append(
                f"{reg}: {value:g} W is beyond the rating {rating:g} W: check its scale "
                f"(scale {profile.register(reg).scale:g}, unit {profile.register(reg).unit!r})"
            )
    return out


def print_table(rows: Sequence[Row], write: Callable[[str], object] = print) -> None:
    """The rows as an aligned table."""
    header = ("register", "address", "raw", "value", "status")
    cells = [header, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    for c in cells:
        write("  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4])


async def probe(
    profile: Profile,
    target: EndpointTarget,
    unit: int,
    *,
    write_test: bool = False,
    confirm: Callable[[str], bool] = lambda _: False,
    step_s: float = 3.0,
    timeout_s: float = 2.0,
    out: Callable[[str], object] = print,
) -> Report:
    """Read (and with ``write_test``, exercise) one unit; the report says what failed."""
    from drivers.factory import make_driver  # noqa: PLC0415
    from essd.clock import RealClock  # noqa: PLC0415

    clock = RealClock()
    endpoint = ModbusEndpoint(target, clock=clock, timeout_s=timeout_s)
    report = Report()
    try:
        await endpoint.connect()
        driver = make_driver(profile, device_id="probe", endpoint=endpoint, unit=unit, clock=clock)
        if profile.driver == "sunspec":
            report.rows = await _read_sunspec(profile, driver)
        else:
            report.rows = await _read_plain(profile, endpoint, unit)
        print_table(report.rows, out)
        report.failures += check(profile, report.rows)
        if write_test:
            from essd.probe_write import write_cycle  # noqa: PLC0415

            await write_cycle(
                profile, driver, report, confirm=confirm, step_s=step_s, clock=clock, out=out
            )
    except (CommunicationError, DeviceError) as exc:
        report.failures.append(f"{target} unit {unit}: {exc}")
    finally:
        await endpoint.close()
    return report
