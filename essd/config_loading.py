"""Loading the configuration: the TOML file (UTF-8, at most :data:`~essd.config.MAX_CONFIG_BYTES`,
checked before it is parsed) plus ``ESSD_...`` environment variables, with every problem
reported as one line naming the dotted field path and where it came from (file or variable).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from essd.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, MAX_CONFIG_BYTES, Settings, config_data
from essd.textfile import read_text_file

__all__ = ["ConfigError", "load_settings"]


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
            msg = "unknown key"
        lines.append(f"{_origin(loc, path, environ)}: {dotted}: {msg}")
    return lines


_UNION_TAGS = {"tcp", "rtu-over-tcp", "serial"}


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
