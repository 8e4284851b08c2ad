"""``python -m edge`` = the ``fer-edge`` command (for when the console script is not on PATH)."""
import sys

from edge.cli import main

sys.exit(main())
