"""``python -m hil_sim --site FILE``: serve a site's devices as simulated hardware."""

import sys

from hil_sim.cli import main

sys.exit(main())
