"""Fault injection scripted on a timeline (a YAML file, validated by pydantic).

A fault file::

    faults:
      - {kind: comm_loss, device: home-a, at: 10m, duration: 5m}
      - {kind: delay, device: pcs1, at: 1h, duration: 10m, delay_s: 0.8}
      - {kind: exception_responses, device: home-b, at: 2h, duration: 1m, code: 6}

``at`` is the offset from the simulation start and ``duration`` how long the fault lasts, in
simulated seconds or as ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``. Kinds:

- ``comm_loss``: the device stops answering (the client times out);
- ``meter_loss``: the same, for a meter;
- ``delay``: every answer arrives ``delay_s`` *real* seconds late, through a delaying TCP proxy
  in front of the device's port (network latency is real time at any clock speed);
- ``frozen_registers``: measurements stop updating while the physics goes on;
- ``ignored_writes``: writes are acknowledged but not applied;
- ``mode_reset``: the device drops its commanded mode and its connections (as after a restart);
  a client that reconnects reads the device's own mode;
- ``exception_responses``: every request is answered with Modbus exception ``code`` (default 4,
  device failure);
- ``bms_fault``: the BMS trips on over-temperature: live limits 0, alarm set, until the cells
  cool down after the fault ends;
- ``unplugged``: a portable unit leaves the site: no answer, no exchange, its outputs (when
  enabled) feed ``away_use_w`` to the campers;
- ``connection_drop``: every open connection is cut at ``at`` (clients must reconnect);
- ``connection_refused``: open connections are cut and new ones refused for ``duration``;
- ``meter_glitch``: the meter reports ``value_w`` (a wrong value inside its register range,
  with the meter's usual wobble) for ``duration`` while the true grid is unchanged; a
  ``duration`` shorter than one cycle period is a single glitched read;
- ``meter_drift``: the meter's reading drifts away from the truth at ``drift_w_per_s`` (either
  sign) for ``duration``, then reads true again;
- ``safe_mode_ignored``: the unit acknowledges a write that would put it in its safe mode but
  does not take it: the write of the safe mode's mode literals (not its power values) is
  answered and undone, so a read-back shows the old value. The unit's own revert timer and
  heartbeat loss still take it to safe mode.

Transport faults (``delay``, ``connection_drop``, ``connection_refused``, and the connection
cut of ``mode_reset``) act on the device's port, so they hit every unit served behind it.
Errors name the file and the dotted field (``faults.2.delay_s: ...``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

FaultKind = Literal[
    "comm_loss",
    "meter_loss",
    "delay",
    "frozen_registers",
    "ignored_writes",
    "mode_reset",
    "exception_responses",
    "bms_fault",
    "unplugged",
    "connection_drop",
    "connection_refused",
    "meter_glitch",
    "meter_drift",
    "safe_mode_ignored",
]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]
# Kinds that happen at one instant; the others last ``duration``.
INSTANT_KINDS = frozenset({"mode_reset", "connection_drop"})
# Kinds only a meter can have.
METER_KINDS = frozenset({"meter_loss", "meter_glitch", "meter_drift"})

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("must be a duration in seconds or like '15m', '2h'")
    if isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"not a duration: {value!r} (seconds, or a number with s/m/h/d)")
        v = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        raise ValueError("must be a duration in seconds or like '15m', '2h'")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"must be a finite duration >= 0, got {value!r}")
    return v


Seconds = Annotated[float, BeforeValidator(parse_duration)]


class FaultSpec(BaseModel):
    """One fault: ``kind`` on ``device`` from ``at`` (offset, s) for ``duration`` (s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    device: str = Field(min_length=1)
    at: Seconds
    duration: Seconds = 0.0
    delay_s: Annotated[float, Field(gt=0, le=10.0)] | None = Field(
        None, description="kind delay: real seconds added to every answer"
    )
    away_use_w: Annotated[float, Field(ge=0, le=1e6)] = Field(
        0.0, description="kind unplugged: what the campers draw from the unit while away"
    )
    code: Literal[1, 2, 3, 4, 6] = Field(
        4, description="kind exception_responses: the Modbus exception code answered"
    )
    value_w: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="kind meter_glitch: what the meter reports, W (> 0 imports)"
    )
    drift_w_per_s: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="kind meter_drift: how fast the reading leaves the truth, W/s"
    )

    @model_validator(mode="after")
    def _params(self) -> Self:
        if self.kind not in INSTANT_KINDS and self.duration <= 0:
            raise ValueError(f"duration: must be > 0 for kind {self.kind}")
        if self.kind == "delay" and self.delay_s is None:
            raise ValueError("delay_s: required for kind delay")
        if self.kind != "delay" and self.delay_s is not None:
            raise ValueError("delay_s: only for kind delay")
        if self.kind != "unplugged" and self.away_use_w:
            raise ValueError("away_use_w: only for kind unplugged")
        if self.kind != "exception_responses" and "code" in self.model_fields_set:
            raise ValueError("code: only for kind exception_responses")
        for param, kind in (("value_w", "meter_glitch"), ("drift_w_per_s", "meter_drift")):
            given = getattr(self, param) is not None
            if self.kind == kind and not given:
                raise ValueError(f"{param}: required for kind {kind}")
            if self.kind != kind and given:
                raise ValueError(f"{param}: only for kind {kind}")
        if self.kind == "meter_drift" and self.drift_w_per_s == 0.0:
            raise ValueError("drift_w_per_s: must not be 0")
        return self

    @property
    def end(self) -> float:
        """Offset at which the fault clears."""
        return self.at + self.duration


class FaultFile(BaseModel):
    """A fault file: the timeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    faults: tuple[FaultSpec, ...] = ()


class FaultError(ValueError):
    """A fault file cannot be used; the message names the file and the field."""


def load_faults_text(text: str, source: str) -> tuple[FaultSpec, ...]:
    """Parse and validate fault YAML; ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FaultError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise FaultError(f"{source}: a fault file must be a mapping with a 'faults' list")
    try:
        return FaultFile.model_validate(data).faults
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            msg = re.sub(r"^Value error, ", "", err["msg"])
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            lines.append(f"{source}: {loc or '(top level)'}: {msg}")
        raise FaultError("\n".join(lines)) from None


def load_faults(path: Path) -> tuple[FaultSpec, ...]:
    """Load a fault file (FaultError naming the file and field on bad input)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FaultError(f"{path}: cannot read: {exc.strerror}") from None
    return load_faults_text(text, str(path))


def check_devices(faults: Sequence[FaultSpec], devices: dict[str, str], source: str) -> None:
    """Every fault names a device of the site, of a class that can have it.

    ``devices`` maps device id -> device class (``meter``, ``portable``...).
    """
    problems = []
    for i, f in enumerate(faults):
        cls = devices.get(f.device)
        if cls is None:
            known = ", ".join(sorted(devices)) or "none"
            problems.append(f"{source}: faults.{i}.device: no device {f.device!r} (known: {known})")
        elif f.kind in METER_KINDS and cls != "meter":
            problems.append(f"{source}: faults.{i}.kind: {f.kind} needs a meter, not {cls}")
        elif f.kind == "unplugged" and cls != "portable":
            problems.append(f"{source}: faults.{i}.kind: unplugged needs a portable unit")
        elif f.kind == "safe_mode_ignored" and cls in ("meter", "portable"):
            problems.append(
                f"{source}: faults.{i}.kind: safe_mode_ignored needs a unit with a safe mode"
            )
        elif f.kind in ("bms_fault", "mode_reset") and cls == "meter":
            problems.append(f"{source}: faults.{i}.kind: {f.kind} needs a storage unit")
    if problems:
        raise FaultError("\n".join(problems))


@dataclass(frozen=True, slots=True)
class Transition:
    """A fault starting (``active``) or ending at epoch ``time``."""

    time: float
    fault: FaultSpec
    active: bool


class FaultTimeline:
    """The faults of a run, turned into start/end transitions from ``start`` (epoch s)."""

    def __init__(self, faults: Iterable[FaultSpec], start: float) -> None:
        items: list[Transition] = []
        for f in faults:
            items.append(Transition(start + f.at, f, True))
            if f.kind not in INSTANT_KINDS:
                items.append(Transition(start + f.end, f, False))
        # Ends before starts at the same instant, so back-to-back faults do not cancel out.
        self._pending = sorted(items, key=lambda t: (t.time, t.active))

    def due(self, now: float) -> list[Transition]:
        """Transitions due by ``now`` (each returned once, in time order)."""
        n = 0
        while n < len(self._pending) and self._pending[n].time <= now:
            n += 1
        due, self._pending = self._pending[:n], self._pending[n:]
        return due

    @property
    def pending(self) -> int:
        """Transitions still to come."""
        return len(self._pending)
