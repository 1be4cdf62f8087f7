"""A measured site history for ``essd backtest``: HISTORY.csv.

Columns: ``time`` (ISO 8601 with a UTC offset), ``load_w`` and ``pv_w`` (W, pv >= 0), and
optionally ``import_price``, ``export_price`` (per kWh) and ``carbon_g_per_kwh``. The step is
regular, 1 to 60 minutes; each value is the average over the step that starts at ``time``.
A bad row is a :class:`HistoryError` naming the file, line and column.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

REQUIRED_COLUMNS = ("load_w", "pv_w")
OPTIONAL_COLUMNS = ("import_price", "export_price", "carbon_g_per_kwh")
_NON_NEGATIVE = ("pv_w", "carbon_g_per_kwh")


class HistoryError(ValueError):
    """A history file is unusable; the message names the file, line and column."""


@dataclass(frozen=True, slots=True)
class History:
    """Step-average site data: ``times`` (epoch s of each step's start), ``step_s`` and the
    columns present (``load_w`` and ``pv_w`` always)."""

    path: Path
    times: FloatArray
    step_s: float
    columns: dict[str, FloatArray]

    @property
    def steps(self) -> int:
        """Number of rows."""
        return len(self.times)

    @property
    def end(self) -> float:
        """Epoch s at which the last step ends."""
        return float(self.times[-1]) + self.step_s

    def column(self, name: str) -> FloatArray | None:
        """The column ``name``, or None when the file has none."""
        return self.columns.get(name)

    def index(self, t: float) -> int:
        """The first row whose step starts at or after epoch ``t``."""
        return int(np.searchsorted(self.times, t - 1e-6, side="left"))


def _time(raw: str | None, where: str) -> float:
    if raw is None or not raw.strip():
        raise HistoryError(f"{where}: time: empty")
    try:
        dt = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise HistoryError(f"{where}: time: not ISO 8601: {raw!r}") from None
    if dt.tzinfo is None:
        raise HistoryError(f"{where}: time: needs a UTC offset (e.g. +08:00 or Z): {raw!r}")
    return dt.timestamp()


def _header(path: Path, row: list[str]) -> list[str]:
    header = [h.strip() for h in row]
    for name in ("time", *REQUIRED_COLUMNS):
        if name not in header:
            raise HistoryError(f"{path}: line 1: {name}: column missing")
    known = {"time", *REQUIRED_COLUMNS, *OPTIONAL_COLUMNS}
    for name in header:
        if name not in known:
            raise HistoryError(f"{path}: line 1: {name}: unknown column")
    if len(set(header)) != len(header):
        raise HistoryError(f"{path}: line 1: a column appears twice")
    return header


def _value(cells: dict[str, str], name: str, where: str) -> float:
    try:
        v = float(cells[name])
    except ValueError:
        raise HistoryError(f"{where}: {name}: not a number: {cells[name]!r}") from None
    if not math.isfinite(v):
        raise HistoryError(f"{where}: {name}: not finite")
    if name in _NON_NEGATIVE and v < 0:
        raise HistoryError(f"{where}: {name}: must be >= 0, got {v:g}")
    return v


def _regular_step(path: Path, t: FloatArray, lines: list[int]) -> float:
    step = float(t[1] - t[0])
    if not 60.0 <= step <= 3600.0:
        raise HistoryError(
            f"{path}: line {lines[1]}: time: step must be 1 to 60 min, got {step:g} s"
        )
    diffs = np.diff(t)
    bad = np.flatnonzero(np.abs(diffs - step) > 1e-3)
    if bad.size:
        k = int(bad[0])
        raise HistoryError(
            f"{path}: line {lines[k + 1]}: time: steps must be regular ({step:g} s),"
            f" got {diffs[k]:g} s"
        )
    return step


def read_history(path: Path) -> History:
    """Read and check HISTORY.csv; raises :class:`HistoryError` naming line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HistoryError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise HistoryError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(text.splitlines())
    try:
        header = _header(path, next(reader))
    except StopIteration:
        raise HistoryError(f"{path}: line 1: empty file, expected a header") from None
    names = [h for h in header if h != "time"]
    times: list[float] = []
    lines: list[int] = []
    values: dict[str, list[float]] = {n: [] for n in names}
    for line, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}: line {line}"
        if len(row) != len(header):
            raise HistoryError(f"{where}: expected {len(header)} fields, got {len(row)}")
        cells = dict(zip(header, row, strict=True))
        times.append(_time(cells["time"], where))
        lines.append(line)
        for n in names:
            values[n].append(_value(cells, n, where))
    if len(times) < 2:
        raise HistoryError(f"{path}: need at least two data rows, got {len(times)}")
    t = np.asarray(times)
    step = _regular_step(path, t, lines)
    cols = {n: np.asarray(v, dtype=np.float64) for n, v in values.items()}
    return History(path=path, times=t, step_s=step, columns=cols)
