"""Run every ``benchmarks/bench_*.py`` module and write ``bench-results.json``.

Each module exposes ``run() -> list[Result]``. Figures are printed as they are measured, side
by side in one run on this machine, and written as a JSON list of {"name", "value", "unit"}.
Pass module names (``python -m benchmarks optimizer``) to run only some.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks import Result


def main(argv: list[str]) -> int:
    """Run the selected benchmark modules and write the results file."""
    names = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )
    wanted = argv or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark module(s): {', '.join(unknown)}; have: {', '.join(names)}")
        return 2
    results: list[Result] = []
    for name in wanted:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        for r in module.run():
            print(f"  {r.name:<44} {r.value:>12.3f} {r.unit}", flush=True)
            results.append(r)
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    out = Path("bench-results.json")
    out.write_text(
        json.dumps([{"name": r.name, "value": r.value, "unit": r.unit} for r in results], indent=2)
        + "\n"
    )
    print(f"wrote {out} ({len(results)} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
