"""`python -m pipeline ...` is the `revcol` command (what `ray job submit` runs)."""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
