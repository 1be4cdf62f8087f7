"""On-change writes (profile schema 2, ``write: on_change`` with ``refresh_s``).

Some devices hold a setpoint in flash: rewriting an unchanged command every TTL/3 costs about
4,300 writes per register per day. For an action marked ``on_change``, a step whose register
already holds what it would write -- as last written *and read back* -- is skipped, unless
``refresh_s`` has passed since it was last written. Read-back still covers every register of
the action, skipped or not: a register that no longer reads what was written (the device
rebooted, someone changed it) is forgotten, so the next call writes it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivers.profile import Action


class WriteMemory:
    """The words last written to each register and when (monotonic seconds)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple[int, ...], float]] = {}

    def skip(self, action: Action, register: str, words: Sequence[int], now: float) -> bool:
        """True when ``action`` is on-change and ``register`` holds ``words`` written less
        than ``refresh_s`` ago."""
        if action.write != "on_change" or action.refresh_s is None:
            return False
        last = self._last.get(register)
        return last is not None and last[0] == tuple(words) and now - last[1] < action.refresh_s

    def written(self, register: str, words: Sequence[int], now: float) -> None:
        """Record a write of ``words`` to ``register`` at ``now``."""
        self._last[register] = (tuple(words), now)

    def forget(self, register: str) -> None:
        """The register did not read back what was written: write it next time."""
        self._last.pop(register, None)
