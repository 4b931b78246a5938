"""`python -m pipeline.cli`: the `harmonize` command."""

from pipeline.cli import main

main()
