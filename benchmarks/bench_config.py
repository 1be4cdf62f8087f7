"""Configuration checks on hostile input: how long `essd check-config` takes to refuse a
profile holding a YAML alias bomb (billion laughs: 10**9 strings if it were ever expanded),
and to accept the example site.

The issue asks for the bomb to be refused in under 1 s; the figure is measured in-process
through the same entry point the command line uses.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import Result
from drivers.profile_loader import resolve_profile
from essd.cli import main
from essd.demo import EXAMPLE_SITE


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for n in range(1, levels + 1):
        refs = ",".join([f"*a{n - 1}"] * 10)
        lines.append(f"a{n}: &a{n} [{refs}]")
    return "\n".join(lines)


def _site(folder: Path) -> Path:
    profile = resolve_profile("household-hybrid-forcible").model_dump(mode="json", by_alias=True)
    text = yaml.safe_dump({**profile, "name": "hostile"}, sort_keys=False)
    text = text.replace("capabilities:", _bomb() + "\ncapabilities:", 1)
    (folder / "profiles").mkdir()
    (folder / "profiles" / "hostile.yaml").write_text(text, encoding="utf-8")
    config = folder / "essd.toml"
    config.write_text(
        f'profile_dirs = ["{folder / "profiles"}"]\n'
        '[site]\nid = "bomb"\ntimezone = "Asia/Shanghai"\n'
        "grid_import_limit_w = 9000\ngrid_export_limit_w = 0\n"
        '[tariff]\ncurrency = "CNY"\nimport_price_per_kwh = 0.5\n'
        '[[devices]]\nid = "inv"\nprofile = "hostile"\n'
        'transport = { kind = "tcp", host = "127.0.0.1", port = 1502, unit = 1 }\n',
        encoding="utf-8",
    )
    return config


def _timed_check(path: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = main(["check-config", str(path)])
    return code, time.perf_counter() - started


def run() -> list[Result]:
    """Seconds to refuse the alias bomb and to accept the example site."""
    with tempfile.TemporaryDirectory() as tmp:
        code, bomb_s = _timed_check(_site(Path(tmp)))
    if code != 2:
        raise RuntimeError(f"the alias-bomb profile was not refused (exit {code})")
    code, example_s = _timed_check(EXAMPLE_SITE)
    if code != 0:
        raise RuntimeError(f"the example site did not pass check-config (exit {code})")
    return [
        Result("config.alias_bomb_refused_s", bomb_s, "s"),
        Result("config.alias_bomb_target_ratio", bomb_s / 1.0, "x (of 1 s)"),
        Result("config.check_example_s", example_s, "s"),
    ]
