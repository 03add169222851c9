"""`python -m collafuse` runs the command line."""

import sys

from collafuse.cli import main

sys.exit(main())
