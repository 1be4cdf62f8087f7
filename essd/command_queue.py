"""The bounded queue between receiving operator commands and applying them.

Commands are applied one at a time, in the order they arrived. The queue holds at most
``maxsize`` of them; when a new one arrives at a full queue, the oldest is removed and answered
``dropped`` (it never disappears without a reply). A command refused on arrival is queued as
its refusal and answered in its turn. Replies decided out of turn (``dropped``, the result of a
``standby`` applied on arrival) wait in a separate lane that is served first, so every command
gets exactly one reply and those replies never wait behind commands.

``standby`` is never queued: the receiver applies it on arrival (see :mod:`essd.mqtt`) and
calls :meth:`CommandQueue.supersede` so no older ``mode`` or ``setpoint`` command still waiting
here can undo it; those are answered ``dropped`` too.

Memory: at most ``maxsize`` commands (each under the payload size limit) plus one small reply
per command that was received and not yet answered.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from essd.commands import CommandModel, CommandResult

#: Error text of a command removed from a full queue.
DROPPED_FULL = "command: dropped, the command queue was full"
#: Error text of a command a later ``standby`` made moot.
DROPPED_SUPERSEDED = "command: dropped, superseded by a later standby"
#: Commands a ``standby`` makes moot while they wait in the queue.
SUPERSEDED_BY_STANDBY = ("mode", "setpoint")
#: The receiver's reply to a retained command (queued as its refusal, never applied).
REFUSED_RETAINED = "retain: retained commands are never applied (publish with retain false)"


@dataclass(frozen=True, slots=True)
class Pending:
    """One command waiting for its turn, or a reply waiting to be sent."""

    name: str
    command: CommandModel | CommandResult


def _dropped(item: Pending, error: str) -> Pending:
    echo = item.command.id
    return Pending(item.name, CommandResult(ok=False, error=error, id=echo))


class CommandQueue:
    """Commands in arrival order (bounded), and decided replies (served first)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize: must be at least 1")
        self.maxsize = maxsize
        self._commands: deque[Pending] = deque()
        self._replies: deque[Pending] = deque()
        self._changed = asyncio.Event()
        #: Commands answered ``dropped`` so far (full queue or superseded).
        self.dropped_total = 0

    def __len__(self) -> int:
        """Commands and replies waiting."""
        return len(self._commands) + len(self._replies)

    def put(self, name: str, command: CommandModel | CommandResult) -> bool:
        """Queue a command (or a refusal to send in its turn); False if the oldest was dropped."""
        room = len(self._commands) < self.maxsize
        if not room:
            self._reply(_dropped(self._commands.popleft(), DROPPED_FULL))
            self.dropped_total += 1
        self._commands.append(Pending(name, command))
        self._changed.set()
        return room

    def reply(self, name: str, result: CommandResult) -> None:
        """Send ``result`` before any queued command (e.g. of a ``standby`` already applied)."""
        self._reply(Pending(name, result))

    def supersede(self, names: Collection[str]) -> int:
        """Answer every queued command named in ``names`` ``dropped``; how many there were."""
        keep: deque[Pending] = deque()
        n = 0
        for item in self._commands:
            if item.name in names and isinstance(item.command, CommandModel):
                self._reply(_dropped(item, DROPPED_SUPERSEDED))
                n += 1
            else:
                keep.append(item)
        self._commands = keep
        self.dropped_total += n
        return n

    def pop(self) -> Pending | None:
        """The next decided reply, else the oldest command; None when both are empty."""
        if self._replies:
            return self._replies.popleft()
        if self._commands:
            return self._commands.popleft()
        self._changed.clear()
        return None

    async def get(self) -> Pending:
        """Like :meth:`pop`, waiting until there is something."""
        while (item := self.pop()) is None:
            await self._changed.wait()
        return item

    def _reply(self, item: Pending) -> None:
        self._replies.append(item)
        self._changed.set()
