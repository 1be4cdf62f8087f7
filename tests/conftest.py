"""Test-wide settings.

Property tests draw the same examples on every run (``derandomize``), so CI gives the same
verdict on every machine and every try; exploring new examples is done on purpose, e.g.
``pytest --hypothesis-profile=explore tests/test_credibility.py``.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("essd", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=2000, print_blob=True)
settings.load_profile("essd")
