"""``python -m edge.cli`` = the ``fer-edge`` command."""
import sys

from edge.cli import main

sys.exit(main())
