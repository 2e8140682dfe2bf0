"""benchmarks/gpu.sh stays runnable where there is no GPU: one line, exit 0, after checking its pieces."""
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow  # a whole process and a pytest collection
def test_gpu_suite_without_a_gpu_checks_its_pieces_and_exits_0(tmp_path):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is here: gpu.sh would run the whole suite")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path),
                            "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().startswith("no CUDA device") and r.stdout.count("\n") == 1, r.stdout


def test_gpu_suite_without_a_gpu_or_torch_says_so_in_one_line(tmp_path):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is here: gpu.sh would run the whole suite")
    python = tmp_path / "python"  # a python without torch: its import fails
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "OUT": str(tmp_path), "HOME": str(tmp_path)})
    assert r.returncode == 1 and r.stderr == "", r.stdout + r.stderr
    assert r.stdout.startswith("no CUDA device") and "has no torch" in r.stdout and r.stdout.count("\n") == 1
