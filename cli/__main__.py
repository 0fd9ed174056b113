"""`python -m cli`: the same as the `neatft` console script."""

from cli.main import run

run()
