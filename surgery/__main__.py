"""`python -m surgery …`: the `surgery` command, where the console script is not on PATH."""
from surgery_cli import run

run()
