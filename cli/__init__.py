"""The `surgery` command line: a thin click layer over the `surgery` library."""
import signal
import sys


def _terminated(signum, frame):
    """SIGTERM / SIGHUP (`timeout`, a job scheduler, a closed terminal) unwind like Ctrl-C: an output's temporary
    sibling — a half-written merge can be most of a model — is removed on the way out, not left behind."""
    raise SystemExit(128 + signum)


def run() -> None:
    """The `surgery` console script (and `python -m surgery`). A Ctrl-C while the commands import torch (their
    first second) ends as click ends one later — 'Aborted!', exit status 1 — not with an import traceback."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # (no SIGHUP on Windows)
        if sig is not None:
            signal.signal(sig, _terminated)
    for stream in (sys.stdout, sys.stderr):  # a stream that cannot encode '→' or 'σ' (Windows' cp1252 when
        reconfigure = getattr(stream, "reconfigure", None)  # redirected) gets '?', not a traceback after the work
        if reconfigure is not None:
            reconfigure(errors="replace")
    try:
        from .main import run as main
    except KeyboardInterrupt:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    main()
