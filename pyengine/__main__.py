"""`python -m pyengine ...` runs the `pyengine` command."""

import sys

from pyengine.cli import main

if __name__ == "__main__":
    sys.exit(main())
