"""Loading device profiles: from YAML text, from a file (cached by resolved path, size and
modification time), by name from the shipped and extra profile folders.

A profile file is UTF-8 text of at most :data:`MAX_PROFILE_BYTES` (checked before it is read),
YAML without anchors or aliases (refused as soon as the parser meets one, so an alias bomb is
never expanded), every number finite. Errors are :class:`~drivers.profile.ProfileError` naming
the file and the dotted field path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import ValidationError
from yaml.nodes import Node

from drivers.profile import Profile, ProfileError
from essd.textfile import read_text_file

MAX_PROFILE_BYTES = 1024 * 1024  # the largest shipped profile is under 10 KiB


class _AnchorRefused(yaml.MarkedYAMLError):
    """The profile uses a YAML anchor or alias."""


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases where it meets the first one.

    Profiles have no use for them, and refusing them at composition means an alias bomb
    ("billion laughs") is rejected before a single alias is expanded.
    """

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        """Compose a node, refusing an alias (``*name``) or an anchor (``&name``)."""
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(
                problem="YAML anchors and aliases (&name, *name) are not allowed in a profile",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)  # type: ignore[arg-type]


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def load_profile_text(text: str, source: str) -> Profile:
    """Parse and validate profile YAML; ``source`` names it in errors."""
    if len(text) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{source}: more than the {MAX_PROFILE_BYTES} bytes a profile may have")
    try:
        data = yaml.load(text, Loader=_ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except _AnchorRefused as exc:
        mark = exc.problem_mark
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise ProfileError(f"{source}:{where} {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{source}:{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = re.sub(r"^Value error, ", "", err["msg"])
            loc = _loc(err["loc"])
            # A check across fields names its own dotted path at the start of its message.
            lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
        raise ProfileError("\n".join(lines)) from None


# Profiles loaded so far, by (resolved path, size, mtime): each file is parsed once.
_loaded: dict[tuple[Path, int, int], Profile] = {}


def load_profile(path: Path) -> Profile:
    """Load and validate one profile file (cached while the file is unchanged)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    key = (path.resolve(), st.st_size, st.st_mtime_ns)
    cached = _loaded.get(key)
    if cached is not None:
        return cached
    try:
        text = read_text_file(path, max_bytes=MAX_PROFILE_BYTES, what="profile")
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    profile = load_profile_text(text, str(path))
    if profile.name != path.stem:
        raise ProfileError(f"{path}: name: {profile.name!r} must match the file name {path.stem!r}")
    _loaded[key] = profile
    return profile


def shipped_profiles_dir() -> Path:
    """The ``profiles/`` directory shipped with essd."""
    import profiles  # noqa: PLC0415 - the data package, imported where it is needed

    return Path(profiles.__file__).parent


def _profile_dirs(extra: tuple[Path, ...]) -> list[Path]:
    return [*extra, shipped_profiles_dir() / "devices"]


def list_profiles(extra_dirs: tuple[Path, ...] = ()) -> list[Profile]:
    """Every profile in the extra directories and the shipped ones (earlier dirs win)."""
    seen: dict[str, Profile] = {}
    for d in _profile_dirs(extra_dirs):
        for path in sorted(d.glob("*.yaml")):
            if path.stem not in seen:
                seen[path.stem] = load_profile(path)
    return sorted(seen.values(), key=lambda p: p.name)


def resolve_profile(name: str, extra_dirs: tuple[Path, ...] = ()) -> Profile:
    """Load the profile called ``name`` (ProfileError listing the known names otherwise)."""
    for d in _profile_dirs(extra_dirs):
        path = d / f"{name}.yaml"
        if path.is_file():
            return load_profile(path)
    known = sorted({p.stem for d in _profile_dirs(extra_dirs) for p in d.glob("*.yaml")})
    raise ProfileError(f"profile {name!r} not found (known: {', '.join(known) or 'none'})")
