"""Loading the configuration: the TOML file (UTF-8, at most :data:`~essd.config.MAX_CONFIG_BYTES`,
checked before it is parsed) plus ``ESSD_...`` environment variables, with every problem
reported as one line naming the dotted field path and where it came from (file or variable).

An unknown key names the closest known key of its section ("did you mean"), and a ratio field
given as a percentage (``reserve_soc = 15``) says that it is a ratio 0..1 and suggests the
ratio (0.15).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from essd.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, MAX_CONFIG_BYTES, Settings, config_data
from essd.textfile import read_text_file


class ConfigError(Exception):
    """The configuration is invalid: ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p) for p in loc).upper()


def _origin(loc: tuple[int | str, ...], path: Path | None, environ: dict[str, str]) -> str:
    """Name the environment variable that set a field, else the file."""
    upper = {k.upper() for k in environ}
    for n in range(len(loc), 0, -1):
        name = _env_name(loc[:n])
        if name in upper:
            return f"environment {name}"
    return str(path) if path is not None else "configuration"


def _format_errors(exc: ValidationError, path: Path | None) -> list[str]:
    environ = dict(os.environ)
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        msg = re.sub(r"^Value error, ", "", err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(loc)
        elif err["type"] == "missing":
            msg = "required" + _REQUIRED_HINTS.get(str(loc[-1]) if loc else "", "")
        elif _is_ratio_error(err):
            msg = f"{msg}: a ratio 0..1" + _ratio_hint(err.get("input"))
        lines.append(f"{_origin(loc, path, environ)}: {dotted}: {msg}")
    return lines


_UNION_TAGS = {"tcp", "rtu-over-tcp", "serial"}

_REQUIRED_HINTS = {
    "timezone": ' (the IANA name of the site\'s time zone, e.g. "Europe/Berlin"; see '
    "`timedatectl` or /etc/timezone)",
    "currency": ' (the ISO 4217 code of the tariff\'s currency, e.g. "EUR")',
}


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, tuples, lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if origin is not None or isinstance(annotation, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def _known_keys(loc: tuple[int | str, ...]) -> set[str]:
    """The keys allowed beside the last part of ``loc`` (the section that holds it)."""
    from essd.config import Settings  # noqa: PLC0415 - the module is loaded already

    models: list[type[BaseModel]] = [Settings]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for model in models:
            info = model.model_fields.get(part)
            if info is not None:
                nxt.extend(_models(info.annotation))
        models = nxt
    return {name for model in models for name in model.model_fields}


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    if not loc or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], sorted(_known_keys(loc)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_ratio_error(err: Any) -> bool:
    """A ``Ratio`` field (0..1) out of range."""
    ctx = err.get("ctx") or {}
    return (err["type"] == "less_than_equal" and ctx.get("le") == 1.0) or (
        err["type"] == "greater_than_equal" and ctx.get("ge") == 0.0 and _ratio_named(err)
    )


def _ratio_named(err: Any) -> bool:
    last = err["loc"][-1] if err["loc"] else ""
    return isinstance(last, str) and (last.endswith(("_soc", "_ratio")))


def _ratio_hint(value: Any) -> str:
    if isinstance(value, int | float) and 1 < value <= 100:
        return f"; did you mean {value / 100:g}?"
    return ""


def load_settings(path: Path | None = DEFAULT_CONFIG_PATH, **overrides: Any) -> Settings:
    """Load the configuration from ``path`` and the environment; ConfigError on any problem.

    ``path=None`` reads the environment (and ``overrides``) only.
    """
    data = None if path is None else _read_toml(path)
    token = config_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path)) from None
    finally:
        config_data.reset(token)


def _read_toml(path: Path) -> dict[str, Any]:
    """Read and parse the configuration file once; ConfigError naming the file otherwise."""
    try:
        text = read_text_file(path, max_bytes=MAX_CONFIG_BYTES, what="configuration file")
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
