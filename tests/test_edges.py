"""Issue-12 edges: writes over Linux's 2 GiB per-call cap, single-shard bases with an index, --dtype in the
merged config, an adapter as the merge output, nested outputs, reader notes, OS errors as one line."""
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from peft import PeftModel  # noqa: E402

from surgery import SurgeryError  # noqa: E402
from surgery.io.safetensors_file import write_all  # noqa: E402
from surgery_cli.main import main  # noqa: E402

from .conftest import FIXTURES, KOHYA_FIXTURE, PEFT_FIXTURE, lora_pair, tree_digest  # noqa: E402
from .test_merge import load, logits, random_lora, tiny_llama  # noqa: E402

CAP = 2_147_479_552  # the most one write() moves on Linux


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r, notes=False):
    """One `error:` line and nothing else (but the reader's `note:` lines printed before it, with notes)."""
    lines = [line for line in r.output.strip().splitlines() if not (notes and line.startswith("note: "))]
    return r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output


class Capped:
    """A file whose write() moves at most `cap` bytes per call, as Linux's does."""

    def __init__(self, cap):
        self.cap, self.data = cap, bytearray()

    def write(self, b):
        b = memoryview(b)[: self.cap]
        self.data += b
        return len(b)


def test_write_all_loops_over_short_writes():
    f = Capped(7)
    write_all(f, torch.arange(100, dtype=torch.uint8).numpy())
    assert bytes(f.data) == bytes(range(100))


@pytest.mark.slow  # writes a tensor over 2 GiB
def test_merge_of_a_tensor_over_the_write_cap(tmp_path):
    """A real > 2 GiB tensor through `surgery merge` (one write() would stop at CAP bytes)."""
    rows = CAP // (4 * 1024) + 1  # float32 (rows, 1024): just over the cap
    W = torch.zeros(rows, 1024)
    W[-1, :] = 1.0
    save_file({"big.weight": W}, str(tmp_path / "base.safetensors"))
    del W
    B, A = torch.zeros(rows, 1), torch.ones(1, 1024)
    B[-1, 0] = 2.0
    save_file({"big.lora_A.weight": A, "big.lora_B.weight": B}, str(tmp_path / "lora.safetensors"))
    r = run("merge", tmp_path / "base.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    (tmp_path / "base.safetensors").unlink()
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        t = f.get_slice("big.weight")
        assert t.get_shape() == [rows, 1024]
        assert torch.equal(t[rows - 2:], torch.tensor([[0.0] * 1024, [3.0] * 1024]))


def test_single_listed_shard_and_dtype_config_load_in_transformers(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    os.rename(base / "model.safetensors", base / "model-00001-of-00001.safetensors")
    with safe_open(str(base / "model-00001-of-00001.safetensors"), "pt") as f:
        keys = list(f.keys())
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    random_lora(load(base), tmp_path / "lora")
    r = run("merge", base, tmp_path / "lora", "-o", tmp_path / "out", "--dtype", "bfloat16", "--device", "cpu")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # dtype from the config
    assert merged.dtype == torch.bfloat16
    ref = PeftModel.from_pretrained(load(base), tmp_path / "lora").merge_and_unload()
    assert torch.allclose(logits(merged), logits(ref), atol=5e-2)


def test_merge_never_writes_over_an_adapter_or_into_itself(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    random_lora(load(base), tmp_path / "lora")
    before = tree_digest(tmp_path / "lora")
    r = run("merge", base, tmp_path / "lora", "-o", tmp_path / "lora", "--force")
    assert one_error_line(r) and "is an input" in r.output and tree_digest(tmp_path / "lora") == before
    for _ in range(2):  # a second merge into base/merged must not nest merged/merged
        r = run("merge", base, tmp_path / "lora", "-o", base / "merged", "--force", "--device", "cpu")
        assert r.exit_code == 0, r.output
    assert not (base / "merged" / "merged").exists()
    transformers.AutoModelForCausalLM.from_pretrained(base / "merged")


def test_no_output_replaces_part_of_an_input_folder(tmp_path):
    """--force never replaces a file inside an input folder (compare --plot over the model's config.json and merge
    -o base/tokenizer.json did), nor a pipeline's component folder; an earlier result folder inside one may go."""
    from surgery.io import check_output

    base, lora = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(FIXTURES / "tiny-llama", base)
    shutil.copytree(PEFT_FIXTURE, lora)
    (lora / "README.safetensors").write_bytes((lora / "README.md").read_bytes())  # any file of the folder
    before = tree_digest(base), tree_digest(lora)
    texts = FIXTURES / "sentences.txt"
    for args in (["compare", base, lora, "--texts", texts, "--max-tokens", 4, "--device", "cpu", "--plot",
                  base / "config.json"],
                 ["merge", base, lora, "-o", base / "tokenizer.json", "--force", "--device", "cpu"],
                 ["squeeze", lora, "--rank", 2, "-o", lora / "README.safetensors", "--force"],
                 ["inspect", lora, "--spectrum", "--plot", lora / "adapter_config.json"]):
        r = run(*args)
        assert one_error_line(r) and "is an input of this command or part of one" in r.output, args
    assert (tree_digest(base), tree_digest(lora)) == before
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(SurgeryError, match="part of one"):
        check_output(pipe / "unet", [pipe], force=True)
    (base / "old-result").mkdir()
    assert check_output(base / "old-result", [base], force=True) == base / "old-result"


def test_merge_force_replaces_only_a_model_folder(tmp_path, monkeypatch):
    """merge --force swaps the whole output folder (no stale shards): a folder that is not a model — a home, a
    repository — was deleted with it; now it is refused. `-o .` left a stray temporary folder (EBUSY)."""
    base, lora = FIXTURES / "tiny-llama", PEFT_FIXTURE
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("precious")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "config.json").write_text("{}")
    for folder in (home, repo):
        before = tree_digest(folder)
        r = run("merge", base, lora, "-o", folder, "--force", "--device", "cpu")
        assert one_error_line(r) and "is not a model folder" in r.output and tree_digest(folder) == before
    r = run("merge", base, lora, "-o", tmp_path / "m", "--device", "cpu")
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path / "m")
    r = run("merge", base, lora, "-o", ".", "--force", "--device", "cpu")  # an earlier result: replaced
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "m", "repo"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(p.name for p in base.iterdir())


def test_reader_notes_are_printed(tmp_path):
    B, A = lora_pair(8, 6, 4)
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": B}, str(tmp_path / "bare.safetensors"))
    r = CliRunner().invoke(main, ["squeeze", str(tmp_path / "bare.safetensors"), "--rank", "2", "--device", "cpu"])
    assert r.exit_code == 0 and "note: bare.safetensors: no adapter config found; assuming lora_alpha = r" in r.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        r = run("squeeze", PEFT_FIXTURE, "--rank", "2", "-o", ro / "out")
        assert one_error_line(r) and "ro" in r.output and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_os_errors_are_one_line(tmp_path, monkeypatch):
    """A full disk (ENOSPC mid-write) and a refused directory (EACCES from mkdtemp): one line, nothing left."""
    import tempfile

    import surgery.io.safetensors_file as sf

    def full(f, data):
        raise OSError(28, "No space left on device", getattr(f, "name", None))

    shutil.copytree(PEFT_FIXTURE, tmp_path / "a")
    before = tree_digest(tmp_path / "a")
    monkeypatch.setattr(sf, "write_all", full)
    r = run("squeeze", tmp_path / "a", "--rank", "2", "-o", tmp_path / "out", "--device", "cpu")
    assert one_error_line(r) and "No space left on device" in r.output
    monkeypatch.undo()

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied", k.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    r = run("squeeze", tmp_path / "a", "--rank", "2", "-o", tmp_path / "out2", "--device", "cpu")
    assert one_error_line(r) and "Permission denied" in r.output
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and tree_digest(tmp_path / "a") == before


def test_alpha_for_a_file_without_config_matches_peft(tmp_path):
    """A PEFT weights file copied without its config: --alpha restores the real scale (alpha 2r here)."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    random_lora(load(base), tmp_path / "lora")  # r = 8, lora_alpha = 16
    shutil.copy(tmp_path / "lora" / "adapter_model.safetensors", tmp_path / "bare.safetensors")
    r = run("merge", base, tmp_path / "bare.safetensors", "-o", tmp_path / "assumed", "--device", "cpu")
    assert r.exit_code == 0 and "assuming lora_alpha = r" in r.output
    r = run("merge", base, tmp_path / "bare.safetensors", "--alpha", "16", "-o", tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 0, r.output
    ref = PeftModel.from_pretrained(load(base), tmp_path / "lora").merge_and_unload()
    assert torch.allclose(logits(load(tmp_path / "out")), logits(ref), atol=1e-5)
    assert not torch.allclose(logits(load(tmp_path / "assumed")), logits(ref), atol=1e-2)
    r = run("merge", base, tmp_path / "lora", "--alpha", "16", "-o", tmp_path / "x")
    assert one_error_line(r) and "states its own scales" in r.output
    r = run("squeeze", tmp_path / "bare.safetensors", "--alpha", "16", "--rank", "8", "-o", tmp_path / "sq",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "sq" / "adapter_config.json").read_text())["lora_alpha"] == 16
    r = run("merge", base, tmp_path / "sq", "-o", tmp_path / "sq-merged", "--device", "cpu")  # lossless rank 8
    assert r.exit_code == 0 and torch.allclose(logits(load(tmp_path / "sq-merged")), logits(ref), atol=1e-4)


def test_fan_in_fan_out_to_kohya_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    model = get_peft_model(transformers.GPT2LMHeadModel(cfg), LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                                         fan_in_fan_out=True))
    model.save_pretrained(tmp_path / "gpt2-lora")
    r = run("convert", tmp_path / "gpt2-lora", "--to", "kohya")
    assert one_error_line(r) and "fan_in_fan_out" in r.output
    assert not (tmp_path / "gpt2-lora-kohya.safetensors").exists()
    r = run("squeeze", tmp_path / "gpt2-lora", "--rank", "2", "-o", tmp_path / "k.safetensors", "--format", "kohya")
    assert one_error_line(r) and not (tmp_path / "k.safetensors").exists()


def test_tera_round_trip_keeps_layers_to_transform(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model = get_peft_model(load(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                  layers_pattern="layers"))
    model.save_pretrained(tmp_path / "lora")
    assert run("convert", tmp_path / "lora", "--to", "tera", "--iters", "2", "-o", tmp_path / "t.safetensors").exit_code == 0
    r = run("convert", tmp_path / "t.safetensors", "--to", "lora", "--rank", "4", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = PeftModel.from_pretrained(load(base), tmp_path / "back")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert not hasattr(back.base_model.model.model.layers[0].self_attn.q_proj, "lora_A")


def test_bad_alpha_and_layout_clashes_are_one_line(tmp_path):
    B, A = lora_pair(8, 6, 4)
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": B}, str(tmp_path / "bare.safetensors"))
    before = tree_digest(tmp_path)
    for bad in ("0", "-1", "nan", "inf"):  # inf was a traceback (an SVD of infinities)
        r = run("squeeze", tmp_path / "bare.safetensors", "--alpha", bad, "--rank", "2", "-o", tmp_path / "o")
        assert one_error_line(r) and "--alpha must be a positive finite number" in r.output
    # scales whose update float32 cannot hold: squeeze and convert --to tera wrote all-zero adapters, merge was a
    # traceback
    r = run("merge", FIXTURES / "tiny-llama", tmp_path / "bare.safetensors", "--alpha", "1e308", "-o", tmp_path / "o")
    assert one_error_line(r) and "module m.q: scale 2.5e+307 (alpha / r) is beyond float32's range" in r.output
    r = run("convert", tmp_path / "bare.safetensors", "--alpha", "1e38", "--to", "tera", "-o", tmp_path / "o.st")
    assert one_error_line(r, notes=True) and "module m.q: its update overflows the float32 fit (scale 2.5e+37)" \
        in r.output
    save_file({"m.q.lora_A.weight": A * 1e4, "m.q.lora_B.weight": B * 1e4}, str(tmp_path / "big.safetensors"))
    r = run("squeeze", tmp_path / "big.safetensors", "--alpha", "1e38", "--rank", "2", "-o", tmp_path / "o")
    assert one_error_line(r, notes=True) and "module m.q: its update (norm 3.4e+45, scale 2.5e+37) is beyond " \
        "float32's range" in r.output
    r = run("merge", tmp_path / "bare.safetensors", tmp_path / "bare.safetensors", "--alpha", "1", "--alpha", "2",
            "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 2 and "2 --alpha values for 1 adapters" in r.output
    (tmp_path / "taken").write_text("a file")
    before = tree_digest(tmp_path)
    r = run("squeeze", PEFT_FIXTURE, "--rank", "2", "-o", tmp_path / "taken", "--force")
    assert one_error_line(r) and "is a file but format peft writes a directory" in r.output
    r = run("inspect", PEFT_FIXTURE, "--spectrum", "--plot", tmp_path / "taken" / "s.png")
    assert r.exit_code == 1 and "s.png: cannot write the output (" in r.output and "taken is a file, not a folder)" in r.output
    assert tree_digest(tmp_path) == before  # nothing written, nothing changed


def test_an_empty_path_is_refused(tmp_path):
    """`-o ""` (an unset shell variable) meant "no -o": the result went beside the input; an empty input was the
    current folder. Both are usage errors now, and nothing is written."""
    shutil.copy(KOHYA_FIXTURE, tmp_path / "k.safetensors")
    for args in (["squeeze", tmp_path / "k.safetensors", "--rank", 2, "-o", ""], ["inspect", ""],
                 ["capture", FIXTURES / "tiny-llama", "--texts", "", "-o", tmp_path / "h.safetensors"]):
        r = run(*args)
        assert r.exit_code == 2 and "an empty path" in r.output, args
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


def test_an_adapter_where_a_model_goes_says_so(tmp_path):
    """Arguments in the wrong order: a PEFT adapter folder given as extract's fine-tuned model or merge's base is
    named as an adapter (it was "no model.safetensors … or their .index.json")."""
    base = FIXTURES / "tiny-llama"
    for args in (("extract", PEFT_FIXTURE, base, "--rank", 2), ("extract", base, PEFT_FIXTURE, "--rank", 2),
                 ("merge", PEFT_FIXTURE, PEFT_FIXTURE)):
        r = run(*args, "-o", tmp_path / "out")
        assert one_error_line(r) and f"{PEFT_FIXTURE}: is a PEFT adapter, not a model" in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_streams_where_files_go(tmp_path):
    """A FIFO or a pipe (`<(cat x)`) given as an adapter or model is one line — it used to be a wrong "corrupt or
    truncated" (the format peek had eaten the stream), a "Not a directory", or, a FIFO with no writer, a hang.
    Texts from a pipe are read once and serve (`--texts <(grep …)` said "no texts"). A FIFO or device as the
    output is refused, --force or not; a symlink loop is one line too."""
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    for args in (("inspect", fifo), ("squeeze", fifo, "--rank", 2, "-o", tmp_path / "o"),
                 ("merge", fifo, PEFT_FIXTURE, "-o", tmp_path / "o"),
                 ("merge", FIXTURES / "tiny-llama", fifo, "-o", tmp_path / "o"),
                 ("extract", fifo, FIXTURES / "tiny-llama", "--rank", 2, "-o", tmp_path / "o")):
        r = run(*args)
        assert one_error_line(r) and "is not a regular file (a pipe or a device)" in r.output, (args, r.output)
    assert not (tmp_path / "o").exists()
    text = (FIXTURES / "sentences.txt").read_bytes()[:4000]
    read, write = os.pipe()
    os.write(write, text)
    os.close(write)
    try:
        r = run("capture", FIXTURES / "tiny-llama", "--texts", f"/dev/fd/{read}", "--max-tokens", 20, "--device",
                "cpu", "-o", tmp_path / "h.safetensors")
    finally:
        os.close(read)
    assert r.exit_code == 0 and "3 layers × 20 tokens" in r.output, r.output
    (tmp_path / "t.txt").write_bytes(text)  # the same texts from a file: the same provenance hash (a second read
    assert run("capture", FIXTURES / "tiny-llama", "--texts", tmp_path / "t.txt", "--max-tokens", 20,  # of the pipe
               "--device", "cpu", "-o", tmp_path / "f.safetensors").exit_code == 0  # hashed nothing)
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as a, safe_open(str(tmp_path / "f.safetensors"), "pt") as b:
        piped, filed = (json.loads(f.metadata()["surgery_capture"]) for f in (a, b))
    lines = [line.strip() for line in text.decode().splitlines() if line.strip()]
    assert piped["texts_sha256"] == filed["texts_sha256"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    r = run("capture", FIXTURES / "tiny-llama", "--texts", "/dev/zero", "-o", tmp_path / "z.safetensors")
    assert one_error_line(r) and "is not a file (a folder or a device)" in r.output, r.output  # never read: endless
    r = run("rerank", "--ids", "/dev/zero", "--targets", "q_proj", "--config-out", tmp_path / "c.json")
    assert one_error_line(r) and "/dev/zero: is not a file" in r.output, r.output  # (it ran out of memory)
    # an output that is a FIFO (or, as root, /dev/null): --force would have renamed a file into its place
    out = tmp_path / "out.safetensors"
    os.mkfifo(out)
    for args in (("squeeze", PEFT_FIXTURE, "--rank", 2), ("merge", FIXTURES / "tiny-llama", PEFT_FIXTURE),
                 ("convert", PEFT_FIXTURE, "--to", "kohya")):
        r = run(*args, "-o", out, "--force")
        assert one_error_line(r) and "is not a regular file or folder (a device or a pipe)" in r.output, r.output
    r = run("inspect", PEFT_FIXTURE, "--spectrum", "--plot", out)
    assert one_error_line(r) and "is not a regular file or folder" in r.output and stat.S_ISFIFO(out.lstat().st_mode)
    loop = tmp_path / "loop"  # a symlink to itself: Path.resolve raised RuntimeError (a traceback) before 3.13
    loop.symlink_to(loop)
    for args in (("squeeze", PEFT_FIXTURE, "--rank", 2, "-o", loop, "--force"),
                 ("merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "-o", loop, "--force"),
                 ("squeeze", PEFT_FIXTURE, "--rank", 2, "--activations", loop, "-o", tmp_path / "o")):
        r = run(*args)
        assert one_error_line(r) and ("is a symlink loop" in r.output or "no such file" in r.output), r.output
    assert loop.is_symlink() and not (tmp_path / "o").exists()


def test_the_python_api_names_a_path_given_for_an_adapter(tmp_path):
    """merge / combine / save_adapter given a path (or a list) where an Adapter goes: an AttributeError or
    TypeError from deep inside before; one SurgeryError naming load_adapter now. merge takes one Adapter alone."""
    from surgery import load_adapter, save_adapter
    from surgery.combine import combine
    from surgery.merge import merge

    a, base = load_adapter(PEFT_FIXTURE), FIXTURES / "tiny-llama"
    for call in (lambda: merge(base, [str(PEFT_FIXTURE)], tmp_path / "m", device="cpu"),
                 lambda: combine([a, PEFT_FIXTURE]), lambda: save_adapter(str(PEFT_FIXTURE), tmp_path / "s"),
                 lambda: save_adapter([a], tmp_path / "s")):
        with pytest.raises(SurgeryError, match=r"expected Adapter objects, got .*load_adapter\(path\) reads one"):
            call()
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()
    merge(base, a, tmp_path / "one", device="cpu")
    merge(base, [a], tmp_path / "listed", device="cpu")
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "listed")


def _interrupt_rename(monkeypatch, when) -> list:
    """os.replace raising KeyboardInterrupt at the call `when(dst, n)` picks (n counts from 1); the calls' dst."""
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if when(dst, len(calls)):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    return calls


def test_an_interrupt_between_the_renames_keeps_the_previous_output(tmp_path, monkeypatch):
    """Replacing a folder output is two renames (the old one aside, the new one in). A Ctrl-C or SIGTERM between
    them removed the new result and left the previous one hidden in `.out.*.old` (then deleted it): the previous
    output is now put back before the interrupt goes on."""
    from surgery.io.safetensors_file import atomic_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("previous")
    calls = _interrupt_rename(monkeypatch, lambda dst, n: n == 2)  # the new result's rename into place
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, is_dir=True, replace=True) as new:
            (new / "b.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["a.txt"]
    assert (out / "a.txt").read_text() == "previous" and len(calls) == 3


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="RLIMIT_FSIZE, SIGXFSZ")
def test_an_output_cut_short_is_one_line_and_nothing_is_left(tmp_path):
    """A write the OS cuts short (a full disk; here RLIMIT_FSIZE, as `ulimit -f` sets it): the safetensors writers
    say the OS's reason; the GGUF writer (numpy's tofile) raised an OSError without one, printed as "(4096
    requested and 784 written)" — it now says it is a short write. Nothing is left in either case."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    for args, msg in [(["convert", PEFT_FIXTURE, "--to", "gguf", "--base", FIXTURES / "tiny-llama", "-o",
                        tmp_path / "a.gguf"], "a.gguf: cannot write the output (a short write, the disk full? "),
                      (["squeeze", PEFT_FIXTURE, "--rank", "8", "-o", tmp_path / "s"],
                       "s: cannot write the output (File too large)")]:
        r = subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], preexec_fn=limited,
                           capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.startswith("error:") and msg in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_an_input_by_another_name_is_still_an_input(tmp_path):
    """The same file or folder reached by another name — a hard link here; a bind mount, or `My-Lora` for
    `my-lora` on a case-insensitive filesystem (macOS, Windows), the same way — compared unequal as a path, and a
    squeeze with --force renamed its result over the input (seen through a bind mount: the input folder was
    replaced). Compared by inode too now."""
    src = tmp_path / "k.safetensors"
    shutil.copy(KOHYA_FIXTURE, src)
    os.link(src, tmp_path / "same.safetensors")
    before = tree_digest(tmp_path)
    r = run("squeeze", src, "--rank", 4, "-o", tmp_path / "same.safetensors", "--force")
    assert r.exit_code == 1 and "same.safetensors: is an input of this command or part of one" in r.output
    assert tree_digest(tmp_path) == before
    assert run("squeeze", src, "--rank", 4, "-o", tmp_path / "other.safetensors").exit_code == 0


@pytest.fixture(params=["tmpfs", "bind"])
def mount_point(tmp_path, request):
    """A tmpfs mounted at tmp_path/vol, or a folder of this filesystem bind-mounted there (`mount --bind`, which
    os.path.ismount does not see: the same device). Root on Linux only; skipped where mounting is not allowed."""
    import subprocess

    vol, src = tmp_path / "vol", tmp_path / "src"
    vol.mkdir()
    src.mkdir()
    how = ["-t", "tmpfs", "-o", "size=64m", "tmpfs"] if request.param == "tmpfs" else ["--bind", str(src)]
    if subprocess.run(["mount", *how, str(vol)], capture_output=True).returncode:
        pytest.skip(f"cannot mount ({request.param}) here")
    yield vol
    subprocess.run(["umount", "-l", str(vol)], capture_output=True)


def test_an_output_folder_that_is_a_mount_point(mount_point, tmp_path):
    """`-o /out` where /out is a Docker volume or a disk's root: a merge failed "Device or resource busy" (the
    folder swapped out by a rename) and a squeeze "Invalid cross-device link" (files renamed in from a sibling on
    the parent's filesystem). The temporary folder now goes inside the mount point; a merge replaces its entries
    (an old shard goes), a PEFT output adds its files; nothing temporary is left."""
    base, vol = FIXTURES / "tiny-llama", mount_point
    (vol / "model-00009-of-00009.safetensors").write_text("an old shard")
    r = run("merge", base, PEFT_FIXTURE, "-o", vol, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in vol.iterdir()) == sorted(p.name for p in base.iterdir())
    r = run("merge", base, PEFT_FIXTURE, "-o", tmp_path / "ref")
    assert tree_digest(vol) == tree_digest(tmp_path / "ref")
    r = run("squeeze", PEFT_FIXTURE, "--rank", 4, "-o", vol, "--force")
    assert r.exit_code == 0, r.output
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= {p.name for p in vol.iterdir()}
    assert not [p for p in [*vol.iterdir(), *tmp_path.iterdir()] if p.name.startswith(".")]
    r = run("squeeze", PEFT_FIXTURE, "--rank", 2, "-o", vol / "adapter", "--force")  # below it: a plain folder
    assert r.exit_code == 0, r.output


def test_replacing_a_mount_points_entries_puts_them_back_on_failure(tmp_path, monkeypatch):
    """The mount-point path (os.path.ismount made true for a plain folder): entries replaced, and an interrupt
    while the new ones move in puts the previous ones back, with nothing new or temporary left."""
    from surgery.io.safetensors_file import atomic_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("previous")
    (out / "lost+found").mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out)
    with atomic_output(out, is_dir=True, replace=True) as new:
        assert new.parent == out
        (new / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "lost+found"]
    _interrupt_rename(monkeypatch, lambda dst, n: Path(dst).name == "c.txt")  # the second new entry
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, is_dir=True, replace=True) as new:
            (new / "a.txt").write_text("newer")
            (new / "c.txt").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "lost+found"] and (out / "b.txt").read_text() == "new"


def test_outputs_through_symbolic_links(tmp_path, request):
    """`-o out` where out links to a folder (often on a bigger disk): a merge replaced the link by a folder of its
    own (the model on the small disk, the link gone) and a squeeze failed "Invalid cross-device link" where the
    target is on another filesystem. Outputs are written through the link, as `cp` does; the link stays."""
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode == 0:
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True))
    target = mnt / "disk"  # on another filesystem where mounting is allowed (root), else on this one
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    r = run("squeeze", PEFT_FIXTURE, "--rank", 4, "-o", tmp_path / "out", "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out").is_symlink() and (target / "adapter_model.safetensors").is_file()
    r = run("merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "-o", tmp_path / "out", "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out").is_symlink() and (target / "model.safetensors").is_file()
    (target / "r4.safetensors").write_text("")
    (tmp_path / "r4.safetensors").symlink_to(target / "r4.safetensors")
    r = run("squeeze", KOHYA_FIXTURE, "--rank", 4, "-o", tmp_path / "r4.safetensors", "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r4.safetensors").is_symlink() and (target / "r4.safetensors").stat().st_size > 1000
    assert not [p for p in [*tmp_path.iterdir(), *target.iterdir()] if p.name.startswith(".")]


def test_a_filesystem_without_modes(tmp_path, monkeypatch):
    """A FAT volume refuses chmod (EPERM): setting the output folder's mode, or copying a side file's mode
    (shutil.copy2 of config.json in a merge), failed the whole write; the modes are now left as they come."""
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    r = run("squeeze", PEFT_FIXTURE, "--rank", 4, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # nor does a filesystem without posix_fadvise (the merge's read-ahead hint) fail a merge
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: refuse(), raising=False)
    r = run("merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output


def test_an_output_name_near_the_filesystems_limit(tmp_path):
    """A 242-character output name (255 bytes is the usual limit) failed "File name too long": its hidden
    temporary sibling was named `.<name>.<random>.tmp`. The sibling's prefix is now the name cut short."""
    out = tmp_path / ("b" * 230 + ".safetensors")
    r = run("squeeze", KOHYA_FIXTURE, "--rank", 4, "-o", out)
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    r = run("squeeze", PEFT_FIXTURE, "--rank", 4, "-o", tmp_path / ("é" * 120))  # 240 bytes of a folder name
    assert r.exit_code == 0, r.output
