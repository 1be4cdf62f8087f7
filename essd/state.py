"""Durable state: what essd must not forget across a restart, a crash or a power cut.

The billing period's demand peak, the energy and cost totals (Home Assistant books them as
``total_increasing``: they must never restart at 0), what the forecasters learned, the last
optimized plan, and the operator's mode and reserve. They live in one JSON file,
``state.json``, in the state directory: ``state.directory`` in the configuration, else
systemd's ``$STATE_DIRECTORY`` (``StateDirectory=essd``: ``/var/lib/essd``); with neither,
state is kept in memory only and essd says so once at start.

Writes are atomic (a temporary file in the same directory, fsync, rename, fsync of the
directory), so a crash leaves the old file or the new one, never half of one; they happen at
most every ``state.save_interval_s`` (60 s) and once more on a clean stop. A file that cannot
be used (truncated, not JSON, another schema, another site) is logged once, moved aside as
``state.json.unusable-<UTC time>`` for inspection, and ignored: essd starts fresh rather than
from state it cannot trust.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_SCHEMA = 1
# A state file is a few kB (a learned profile is 96 numbers); anything far larger is not ours.
MAX_STATE_BYTES = 4 * 1024 * 1024


class StateError(ValueError):
    """A state file that cannot be used; the message names the file and the field."""


def resolve_state_directory(configured: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The state directory: configured, else systemd's ``$STATE_DIRECTORY`` (first entry)."""
    if configured is not None:
        return configured
    env = environ.get("STATE_DIRECTORY", "")
    first = env.split(":")[0].strip()
    return Path(first) if first else None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


class StateStore:
    """One site's state file: load once at start, save atomically at most every interval.

    ``now_mono`` values come from the daemon's clock (monotonic seconds).
    """

    def __init__(self, directory: Path, *, site_id: str, save_interval_s: float = 60.0) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.site_id = site_id
        self.save_interval_s = save_interval_s
        self._saved_mono: float | None = None
        self._warned_save = False

    def load(self) -> dict[str, Any] | None:
        """The saved state's ``data`` object, or None when there is none or it is unusable.

        An unusable file is moved aside with one warning naming why.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("state file %s cannot be read (%s): starting fresh", self.path, exc)
            return None
        try:
            return self._parse(raw)
        except StateError as exc:
            self.set_aside(str(exc))
            return None

    def set_aside(self, why: str) -> Path | None:
        """Move the state file aside (kept for inspection) and log once; returns its new path."""
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{STATE_FILE}.unusable-{stamp}")
        try:
            os.replace(self.path, target)
        except OSError as exc:
            log.warning("%s; could not move it aside (%s): ignoring it", why, exc)
            return None
        log.warning("%s; moved aside to %s, starting fresh", why, target.name)
        return target

    def _parse(self, raw: bytes) -> dict[str, Any]:
        where = str(self.path)
        if len(raw) > MAX_STATE_BYTES:
            raise StateError(f"{where}: larger than {MAX_STATE_BYTES} bytes: not a state file")
        try:
            doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise StateError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise StateError(f"{where}: (top level): must be an object")
        if doc.get("schema") != STATE_SCHEMA:
            raise StateError(f"{where}: schema: expected {STATE_SCHEMA}, got {doc.get('schema')!r}")
        if doc.get("site") != self.site_id:
            raise StateError(
                f"{where}: site: the file belongs to site {doc.get('site')!r}, not {self.site_id!r}"
            )
        data = doc.get("data")
        if not isinstance(data, dict):
            raise StateError(f"{where}: data: must be an object")
        return data

    def due(self, now_mono: float) -> bool:
        """True when a save is allowed again (at most one per interval)."""
        return self._saved_mono is None or now_mono - self._saved_mono >= self.save_interval_s

    def save(self, data: Mapping[str, Any], *, now_mono: float, saved_at: float) -> bool:
        """Write ``data`` atomically; False (logged once) when the directory is not writable.

        ``saved_at`` is wall-clock epoch seconds, recorded for people reading the file.
        """
        self._saved_mono = now_mono
        doc = {"schema": STATE_SCHEMA, "site": self.site_id, "saved_at": saved_at, "data": data}
        try:
            payload = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        except ValueError as exc:  # a non-finite number: a bug upstream, never a corrupt file
            log.error("state not saved: %s", exc)
            return False
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if not self._warned_save:
                self._warned_save = True
                log.warning("state not saved to %s: %s (kept in memory)", self.path, exc)
            tmp.unlink(missing_ok=True)
            return False
        if self._warned_save:
            self._warned_save = False
            log.info("state saved to %s again", self.path)
        return True
