"""The CLI through click's runner (and once as a real process): outputs, JSON, and every bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from surgery import load_adapter
from surgery_cli.main import main

from .conftest import KOHYA_FIXTURE, PEFT_FIXTURE, lora_pair, tree_digest, write_peft


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_table_and_json():
    r = run("inspect", PEFT_FIXTURE)
    assert r.exit_code == 0 and "14 modules" in r.output and "layers.1.mlp.up_proj" in r.output
    r = run("inspect", KOHYA_FIXTURE, "--json", "--spectrum")
    doc = json.loads(r.output)
    assert doc["format"] == "kohya" and len(doc["modules"]) == 6
    conv = next(m for m in doc["modules"] if m["kind"] == "conv")
    assert conv["shape"] == [32, 144] and conv["rank"] == 8 and len(conv["singular_values"]) == 8


@pytest.mark.parametrize("rule", [["--rank", "4"], ["--energy", "0.95"], ["--budget", "10K"],
                                  ["--rank-map", "mlp=2,attn=6"], ["--rank", "3", "--method", "rsvd"]])
def test_squeeze_rules_json(tmp_path, rule):
    r = run("squeeze", PEFT_FIXTURE, "-o", tmp_path / "o", "--json", "--device", "cpu", *rule)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["params_after"] < doc["params_before"] and len(doc["modules"]) == 14
    back = load_adapter(tmp_path / "o")
    assert {n: m.rank for n, m in back.modules.items()} == {m["name"]: m["new_rank"] for m in doc["modules"]}
    if rule[0] == "--budget":
        assert doc["params_after"] <= 10_000


def test_squeeze_human_output_and_format(tmp_path):
    r = run("squeeze", KOHYA_FIXTURE, "--rank", "2", "-o", tmp_path / "k.safetensors")
    assert r.exit_code == 0 and "8→2" in r.output and "wrote" in r.output
    r = run("squeeze", PEFT_FIXTURE, "--rank", "2", "-o", tmp_path / "f.safetensors", "--format", "peft-file",
            "--dtype", "bfloat16")
    assert r.exit_code == 0
    a = load_adapter(tmp_path / "f.safetensors")
    assert a.format == "peft-file" and all(m.dtype == torch.bfloat16 for m in a.modules.values())


def _bad_inputs(tmp_path):
    B, A = lora_pair(8, 6, 4)
    nanB = B.clone()
    nanB[0, 0] = float("inf")
    mism = tmp_path / "mismatch.safetensors"
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": lora_pair(8, 6, 3)[0]}, str(mism))
    nan = write_peft(tmp_path / "nan", {"layers.0.q_proj": (nanB, A)}, r=4, alpha=4)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(KOHYA_FIXTURE.read_bytes()[:-100])
    pkl = tmp_path / "adapter.bin"
    pkl.write_bytes(b"\x80\x04junk")
    return {
        "missing": ([tmp_path / "nope", "--rank", "2"], "no such file"),
        "pickle": ([pkl, "--rank", "2"], "never unpickles"),
        "truncated": ([trunc, "--rank", "2"], "truncated"),
        "mismatch": ([mism, "--rank", "2"], "B has 3 columns"),
        "rank0": ([PEFT_FIXTURE, "--rank", "0"], "at least 1"),
        "budget": ([PEFT_FIXTURE, "--budget", "1K"], "too small"),
        "nan": ([nan, "--rank", "2"], "nan/adapter_model.safetensors: tensor base_model.model.layers.0.q_proj.lora_B.weight "
                                      "holds NaN or Inf"),
        "energy": ([PEFT_FIXTURE, "--energy", "0"], "energy threshold"),
        "cuda": ([PEFT_FIXTURE, "--rank", "2", "--device", "cuda"], "CUDA") if not torch.cuda.is_available() else None,
    }


@pytest.mark.parametrize("case", ["missing", "pickle", "truncated", "mismatch", "rank0", "budget",
                                  "nan", "energy", "cuda"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, case):
    spec = _bad_inputs(tmp_path)[case]
    if spec is None:
        pytest.skip("CUDA present")
    args, message = spec
    src = Path(args[0])
    before = tree_digest(src) if src.exists() else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["squeeze", *map(str, args), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary leftovers either
    if before is not None:
        assert tree_digest(src) == before


def test_usage_errors(tmp_path):
    r = run("squeeze", PEFT_FIXTURE, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = run("squeeze", PEFT_FIXTURE, "--rank", "2", "--energy", "0.9", "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_output_is_never_the_input(tmp_path):
    d = tmp_path / "a"
    shutil.copytree(PEFT_FIXTURE, d)
    before = tree_digest(d)
    for out in (d, d / "adapter_model.safetensors", tmp_path):
        for force in ((), ("--force",)):
            r = run("squeeze", d, "--rank", "2", "-o", out, *force)
            assert r.exit_code == 1 and "is an input" in r.output and tree_digest(d) == before, r.output


def test_real_subprocess(tmp_path):
    cmd = [sys.executable, "-m", "surgery"]  # what a user without the script on PATH runs
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run(cmd + ["squeeze", str(PEFT_FIXTURE), "--rank", "4", "-o", str(tmp_path / "o"), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["params_after"] == 8192 and p.stderr == ""  # no progress bar without a TTY
    p = subprocess.run(cmd + ["squeeze", str(tmp_path / "missing"), "--rank", "4", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    if shutil.which("surgery"):
        p = subprocess.run(["surgery", "inspect", str(PEFT_FIXTURE)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "peft adapter" in p.stdout


def test_ctrl_c_while_torch_imports_is_aborted_not_a_traceback():
    """A Ctrl-C in a command's first second (torch importing) ends as click ends one later: 'Aborted!', exit 1.
    The interrupt is raised by an import hook at torch's import, where a real one lands."""
    probe = ("import sys\n"
             "class Interrupt:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n"
             "            raise KeyboardInterrupt\n"
             "sys.meta_path.insert(0, Interrupt())\n"
             "sys.argv = ['surgery', 'inspect', sys.argv[1]]\n"
             "from surgery_cli import run\n"
             "run()\n")
    p = subprocess.run([sys.executable, "-c", probe, str(PEFT_FIXTURE)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr == "Aborted!\n" and p.stdout == "", p.stderr


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    """`surgery … | head`: stdout's reader gone before the table is printed. It was `error: Broken pipe` and exit
    1 after the work was done; now silence and 141 (128 + SIGPIPE), as any writer a closed pipe ends."""
    p = subprocess.Popen([sys.executable, "-m", "surgery", "squeeze", str(PEFT_FIXTURE), "--rank", "2", "-o",
                          str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the command (a second of imports) prints anything
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141 and err == b"", err
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()  # the work itself was done


def test_an_output_encoding_without_the_tables_characters(tmp_path):
    """stdout in cp1252 (Windows, redirected to a file or a pipe) cannot encode '→': the squeeze was done, then
    its table was a UnicodeEncodeError and "this is a bug", exit 1. Unencodable characters are now '?'."""
    r = subprocess.run([sys.executable, "-m", "surgery", "squeeze", str(PEFT_FIXTURE), "--rank", "2", "-o",
                        str(tmp_path / "o")], capture_output=True, env=os.environ | {"PYTHONIOENCODING": "cp1252"})
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert b" 16?2 " in r.stdout and b"32,768 ? 4,096 parameters" in r.stdout


def test_sigterm_mid_write_leaves_nothing_behind(tmp_path):
    """`timeout`, a job scheduler or a closed terminal (SIGTERM, SIGHUP) stopping a merge while it writes: the
    default action killed the process on the spot and left the output's hidden temporary sibling (most of a model,
    for a large merge). Now it unwinds as Ctrl-C does: nothing is left, exit status 143."""
    import signal
    import time

    base = {f"layers.{i}.proj.weight": torch.randn(1024, 1024) for i in range(24)}  # 100 MB to write
    save_file(base, str(tmp_path / "base.safetensors"))
    write_peft(tmp_path / "lora", {f"layers.{i}.proj": lora_pair(1024, 1024, 4, seed=i) for i in range(24)}, r=4,
               alpha=4)
    out = tmp_path / "merged"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "surgery", "merge", str(tmp_path / "base.safetensors"),
                          str(tmp_path / "lora"), "--device", "cpu", "-o", str(out / "m.safetensors")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.glob(".m.safetensors.*.tmp")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143 and err == b"", (p.returncode, err)
    assert list(out.iterdir()) == []


def test_console_script_freezes_the_imports_out_of_the_collector():
    """`run` (the `surgery` script and `python -m`) leaves torch's objects to the permanent generation, so
    neither full collections nor the teardown at exit walk them; `main` (CliRunner) leaves the collector alone."""
    probe = ("import atexit, gc, sys\n"
             "from surgery_cli.main import main, run\n"
             "before = gc.get_freeze_count()\n"  # not 0 everywhere: Python 3.12 starts with a few hundred
             "atexit.register(lambda: print('frozen', gc.get_freeze_count() - before, flush=True))\n"
             "sys.argv = ['surgery', '--version']\n"
             "(run if {use_run} else main)()\n")
    counts = {}
    for use_run in (True, False):
        p = subprocess.run([sys.executable, "-c", probe.format(use_run=use_run)], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        assert p.returncode == 0 and "surgery, version" in p.stdout, p.stderr
        counts[use_run] = int(p.stdout.split("frozen")[1])
    assert counts[True] > 50_000 and counts[False] == 0
