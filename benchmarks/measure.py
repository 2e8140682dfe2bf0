"""Timing and peak memory of a command as a whole process, for the benchmark scripts.

A child forked from a large parent inherits the parent's resident-set high-water mark across exec, so the
command is started from a small launcher process and its own `ru_maxrss` is read there.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"status": status, "maxrss_kb": usage.ru_maxrss, "stderr": p.stderr.read().decode()[-2000:]}))
"""


def timed(cmd: list[str], clean: list[Path] = ()) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `cmd`; `clean` paths are removed first, outside the timing."""
    for p in clean:
        shutil.rmtree(p, ignore_errors=True) if Path(p).is_dir() else Path(p).unlink(missing_ok=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout)
    if res["status"]:
        raise SystemExit(f"{cmd[:4]} failed: {res['stderr']}")
    return wall, res["maxrss_kb"] / 1024
