"""benchmarks/gpu.sh stays runnable where there is no GPU: one line, exit 0, after checking its pieces; on a GPU a
failing workload costs its row only."""
import json
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


@pytest.mark.slow  # the CUDA tests' bodies and one workload (LoKr: the quickest to make), as whole processes
def test_gpu_branch_dry_run_with_the_cpu_in_the_gpus_place(tmp_path):
    """GPU_SUITE_DEVICE=cpu takes gpu.sh's GPU branch (never run here otherwise): tests, suite, files, total."""
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path),
                            "HOME": str(tmp_path), "GPU_SUITE_DEVICE": "cpu", "GPU_SUITE_ONLY": "LoKr"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exit status: tests 0, suite 0" in r.stdout.splitlines()[-1]
    assert " passed" in (tmp_path / "pytest.txt").read_text() and "failed" not in (tmp_path / "pytest.txt").read_text()
    table = (tmp_path / "gpu_suite.md").read_text().splitlines()
    assert table[0].startswith("GPU suite: dry run on the CPU") and table[-3].startswith("| LoKr 7B-shaped → LoRA r8 | ")
    [row] = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert row["floor"] > 0 and row["cpu"] > 0 and row["cuda"] > 0 and "error" not in row


def test_a_failing_workload_costs_its_row_not_the_table(tmp_path, monkeypatch):
    """A device window may be the only one: a workload that fails is a row saying why, the rows after it still run,
    the table is on disk after every row, and the exit status says something failed."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    suite = importlib.import_module("gpu_suite")
    py = sys.executable
    ok = [py, "-c", "pass"]
    rows = [dict(name="fine", make=lambda: None, floor=ok, run=lambda dev, out: ok),
            dict(name="broken", make=lambda: None, floor=ok,
                 run=lambda dev, out: [py, "-c", "import sys; sys.exit('boom on ' + sys.argv[1])", dev]),
            dict(name="unmade", make=lambda: 1 / 0, floor=ok, run=lambda dev, out: ok),
            dict(name="in process", make=lambda: None, floor=None, inproc=True,
                 run=lambda dev, out: [py, "-c", "print('{\"seconds\": 0.25}')"])]
    written, write = [], suite.write
    monkeypatch.setattr(suite, "workloads", lambda work: rows)
    monkeypatch.setattr(suite, "write", lambda *a: (written.append(len(a[2])), write(*a)))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--device", "cpu", "--out", str(tmp_path),
                                      "--workdir", str(tmp_path / "w")])
    assert suite.main() == 1
    assert written == [1, 2, 3, 4]
    table = (tmp_path / "gpu_suite.md").read_text().splitlines()
    body = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| ") and "---" not in line}
    assert set(body) == {"work", "fine", "broken", "unmade", "in process"}
    assert "failed" not in body["fine"] and "failed" not in body["in process"]
    assert "failed:" in body["broken"] and "boom on cpu" in body["broken"]
    assert "failed:" in body["unmade"] and "division by zero" in body["unmade"]
    assert "| 0.25 s | 0.25 s |" in body["in process"]
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [("error" in r) for r in saved["rows"]] == [False, True, True, False]
