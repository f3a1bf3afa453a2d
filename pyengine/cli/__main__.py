"""`python -m pyengine.cli ...` runs the `pyengine` command."""

import sys

from pyengine.cli import main

sys.exit(main())
