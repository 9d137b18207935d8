"""`python -m blt ...` is the `blt` command."""

import sys

from blt.cli import main

sys.exit(main())
