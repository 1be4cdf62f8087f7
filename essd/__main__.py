"""``python -m essd``: the essd command line."""

from essd.cli import main

raise SystemExit(main())
