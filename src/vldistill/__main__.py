"""`python -m vldistill` runs the command-line interface (also under torchrun)."""

from vldistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
