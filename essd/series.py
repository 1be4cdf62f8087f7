"""Site time series files (CSV): a ``time`` column and any of :data:`SERIES_COLUMNS`.

One reader for every consumer: the forecaster's series source, the simulator's site series and
the HIL scenarios. Units: W, prices per kWh in the tariff currency, carbon intensity in g/kWh;
times are epoch seconds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class SeriesError(ValueError):
    """A series file is unusable; the message names the file, line and column."""


SERIES_COLUMNS = ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")


def parse_series_time(
    raw: str, tz: ZoneInfo, where: str, *, error: type[ValueError] = SeriesError
) -> float:
    """Epoch seconds of a series ``time`` cell: epoch seconds or ISO 8601 (local if naive)."""
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise error(f"{where}: not ISO 8601 or epoch seconds: {raw!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp()


def read_series_csv(
    path: Path,
    tz: ZoneInfo,
    *,
    error: type[ValueError] = SeriesError,
    non_negative: Collection[str] = (),
) -> tuple[FloatArray, dict[str, FloatArray]]:
    """Times (epoch s, strictly increasing) and the columns present in a site series CSV.

    The file has a ``time`` column (ISO 8601 with offset, or epoch seconds; naive times are in
    ``tz``) and any of :data:`SERIES_COLUMNS`. Bad input raises ``error`` naming the file, line
    and column; a column in ``non_negative`` must hold values >= 0.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise error(f"{path}: no data rows")
    header = rows[0].keys()
    if "time" not in header:
        raise error(f"{path}: time: column missing")
    unknown = set(header) - {"time", *SERIES_COLUMNS}
    if unknown:
        raise error(f"{path}: {sorted(unknown)[0]}: unknown column")
    times: list[float] = []
    cols: dict[str, list[float]] = {c: [] for c in SERIES_COLUMNS if c in header}
    for i, row in enumerate(rows, start=2):
        times.append(parse_series_time(row["time"], tz, f"{path}: line {i}: time", error=error))
        for c, column in cols.items():
            try:
                v = float(row[c])
            except (TypeError, ValueError):
                raise error(f"{path}: line {i}: {c}: not a number") from None
            if not math.isfinite(v):
                raise error(f"{path}: line {i}: {c}: not finite")
            if c in non_negative and v < 0:
                raise error(f"{path}: line {i}: {c}: must be >= 0, got {v:g}")
            column.append(v)
    t = np.asarray(times, dtype=np.float64)
    if np.any(np.diff(t) <= 0):
        raise error(f"{path}: time: must be strictly increasing")
    return t, {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}
