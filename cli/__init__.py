"""The `surgery` command line: a thin click layer over the `surgery` library."""
import sys


def run() -> None:
    """The `surgery` console script (and `python -m surgery`). A Ctrl-C while the commands import torch (their
    first second) ends as click ends one later — 'Aborted!', exit status 1 — not with an import traceback."""
    try:
        from .main import run as main
    except KeyboardInterrupt:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    main()
