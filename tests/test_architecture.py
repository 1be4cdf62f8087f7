"""Every shipped module is placed in a layer of the import contracts (pyproject.toml).

import-linter checks only the modules a contract names; a new module that no layer names would
escape the check, so this test fails until it is placed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layered_names() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["id"] == "layers")["layers"]
    return {name.strip("() ") for layer in layers for name in re.split(r"[:|]", layer)}


def _covered(module: str, names: set[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:k]) in names for k in range(1, len(parts) + 1))


def test_every_essd_module_is_in_a_layer() -> None:
    names = _layered_names()
    modules = []
    for path in sorted((ROOT / "essd").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts != ("essd",):
            modules.append(".".join(parts))
    missing = [m for m in modules if not _covered(m, names)]
    assert not missing, f"place these modules in a layer of [tool.importlinter]: {missing}"


def test_drivers_is_a_layer() -> None:
    assert "drivers" in _layered_names()
