"""`python -m pyengine ...` runs the `pyengine` command."""

from pyengine.cli import main

if __name__ == "__main__":
    main()
