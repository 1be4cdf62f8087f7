"""Operator commands from bytes to outcome: strict JSON parsing (duplicate keys, non-finite
constants and oversized payloads refused), validation against the payload models of
:mod:`essd.commands`, and one pure handler that applies a valid command to a
:class:`~essd.commands.CommandTarget` and answers with a :class:`~essd.commands.CommandResult`
whose ``error`` names the field. A refused command changes nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from essd.commands import (
    COMMANDS,
    ECHO_ID,
    MAX_PAYLOAD_BYTES,
    NO_LIMITS,
    CommandLimits,
    CommandModel,
    CommandResult,
    CommandTarget,
    ModeCommand,
    log,
)


def _first_error(exc: ValidationError) -> str:
    """``"dotted.field: message"`` for the first problem (``payload`` for the whole object)."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{loc}: {msg}"


def _echo_id(data: object) -> str | None:
    """The payload's ``id`` when it is a valid echo id, so even refusals can be matched."""
    if isinstance(data, dict):
        raw = data.get("id")
        if isinstance(raw, str) and re.fullmatch(ECHO_ID, raw):
            return raw
    return None


def _reject_constant(token: str) -> Any:
    # json.loads accepts NaN and Infinity by default; JSON has neither.
    raise ValueError(f"{token} is not valid JSON")


class _DuplicateKey(ValueError):
    """A JSON object naming the same key twice (json.loads would keep the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _Invalid(Exception):
    """Internal: a payload that fails parsing; carries the result to send."""

    def __init__(self, error: str, echo: str | None = None) -> None:
        super().__init__(error)
        self.result = CommandResult(ok=False, error=error, id=echo)


def parse_command(name: str, payload: bytes) -> CommandModel:
    """The validated command model of ``payload`` for command ``name``.

    Raises ValueError whose message is ``"field: reason"``.
    """
    try:
        return _parse(name, payload)
    except _Invalid as exc:
        raise ValueError(exc.result.error) from None


def _parse(name: str, payload: bytes) -> CommandModel:
    model = COMMANDS.get(name)
    if model is None:
        raise _Invalid(f"command: unknown command {name[:64]!r} (one of {', '.join(COMMANDS)})")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _Invalid(f"payload: larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        data = json.loads(
            payload.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except _DuplicateKey as exc:
        raise _Invalid(f"{str(exc)[:64]}: duplicate key") from None
    except UnicodeDecodeError:
        raise _Invalid("payload: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise _Invalid(f"payload: not valid JSON ({str(exc)[:80]})") from None
    echo = _echo_id(data)
    if not isinstance(data, dict):
        raise _Invalid("payload: must be a JSON object", echo)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _Invalid(_first_error(exc), echo) from None
    except RecursionError:
        raise _Invalid("payload: nested too deeply", echo) from None


def read_command(name: str, payload: bytes) -> CommandModel | CommandResult:
    """The validated command, or the refusal to send back when ``payload`` is not one."""
    try:
        return _parse(name, payload)
    except _Invalid as exc:
        return exc.result


def echo_id(payload: bytes) -> str | None:
    """The ``id`` of a command payload, if it has a valid one (to label any reply)."""
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return _echo_id(data)


def is_safety_command(command: CommandModel | CommandResult) -> bool:
    """True for ``standby``: it is never dropped from a queue and goes before other commands."""
    return isinstance(command, ModeCommand) and command.mode == "standby"


def apply_command(
    command: CommandModel,
    target: CommandTarget | None,
    *,
    now: float,
    limits: CommandLimits = NO_LIMITS,
) -> CommandResult:
    """Check ``command`` against ``limits`` and apply it; never raises, always returns a result.

    ``now`` (epoch seconds, from the daemon's clock) turns a setpoint's ``ttl_s`` into an
    absolute expiry. ``target`` None means commands are not accepted (a read-only publisher).
    """
    if target is None:
        return CommandResult(
            ok=False, error="command: this daemon accepts no commands", id=command.id
        )
    try:
        command.check_limits(limits, now)
        command.apply(target, now)
    except ValueError as exc:  # CommandRejected, or a target's own ValueError subclass
        return CommandResult(ok=False, error=str(exc), id=command.id)
    except Exception:
        # A bug in the target must not kill the command loop; the operator still gets a reply.
        log.exception("command %s failed in the target", type(command).__name__)
        return CommandResult(
            ok=False, error="command: internal error (see the daemon log)", id=command.id
        )
    return CommandResult(ok=True, id=command.id)


def handle_command(
    name: str,
    payload: bytes,
    target: CommandTarget | None,
    *,
    now: float,
    limits: CommandLimits = NO_LIMITS,
) -> CommandResult:
    """Parse, validate, check and apply one command; never raises, always returns a result."""
    command = read_command(name, payload)
    if isinstance(command, CommandResult):
        return command
    return apply_command(command, target, now=now, limits=limits)
