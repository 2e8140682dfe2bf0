"""Hugging Face repo ids wherever a path goes: a real cache layout (blobs, symlinked snapshots, refs) in a
temporary HF_HOME, offline; local paths win; outputs never go into the cache."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery import load_adapter
from surgery.io.hub import is_repo_id, resolve, split_id
from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE, hub_snapshot, tree_digest

REV = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """acme/tiny-llama (main → REV) and acme/tiny-lora (main → REV; tag v1 → OLD, a rank-2 squeeze of it) in a
    fresh HF_HOME; offline; the current directory an empty work folder."""
    hub = tmp_path / "hf" / "hub"
    hub_snapshot(FIXTURES / "tiny-llama", hub / "models--acme--tiny-llama", REV, "main")
    hub_snapshot(PEFT_FIXTURE, hub / "models--acme--tiny-lora", REV, "main")
    assert run("squeeze", PEFT_FIXTURE, "--rank", 2, "-o", tmp_path / "r2").exit_code == 0
    hub_snapshot(tmp_path / "r2", hub / "models--acme--tiny-lora", OLD, "v1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return hub


def test_ids():
    assert is_repo_id("meta-llama/Llama-3.2-1B") and is_repo_id("gpt2") and is_repo_id("org/name@v1.0")
    assert not is_repo_id("/abs/path") and not is_repo_id("x.safetensors") and not is_repo_id("d/x.safetensors")
    assert not is_repo_id("../up") and not is_repo_id("./here") and not is_repo_id("org/name/../x")
    # a path inside org/name (huggingface_hub's file system spelling); a revision with a slash is a refs/…/… one
    assert split_id("org/name@v1/loras/style.safetensors") == ("org/name", "v1", "loras/style.safetensors")
    assert split_id("org/name@refs/pr/1/checkpoint-500/") == ("org/name", "refs/pr/1", "checkpoint-500")
    assert split_id("gpt2@refs/pr/1") == ("gpt2", "refs/pr/1", None) and split_id("org/name//x") is None


def test_squeeze_an_id_writes_into_the_current_directory(cache):
    digest = tree_digest(cache)
    r = run("squeeze", "acme/tiny-lora", "--rank", 4)
    assert r.exit_code == 0, r.output
    out = cache.parent.parent / "work" / "tiny-lora-r4"
    assert out.is_dir() and r.output.strip().endswith(f"wrote {out}")
    assert tree_digest(cache) == digest  # nothing written into the cache
    run("squeeze", PEFT_FIXTURE, "--rank", 4, "-o", "local-r4")
    mine, theirs = load_file(out / "adapter_model.safetensors"), load_file("local-r4/adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_merge_ids_equals_merge_of_paths(cache):
    r = run("merge", "acme/tiny-llama", "acme/tiny-lora", "-o", "merged")
    assert r.exit_code == 0, r.output
    assert run("merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "-o", "ref").exit_code == 0
    a, b = load_file("merged/model.safetensors"), load_file("ref/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revisions(cache):
    want = load_adapter(cache / "models--acme--tiny-lora" / "snapshots" / OLD)
    assert {m.rank for m in want.modules.values()} == {2}
    for args in (["acme/tiny-lora@v1"], ["acme/tiny-lora", "--revision", "v1"], [f"acme/tiny-lora@{OLD}"]):
        r = run("inspect", *args, "--json")
        assert r.exit_code == 0, r.output
        assert {m["rank"] for m in json.loads(r.stdout)["modules"]} == {2}
    r = run("inspect", "acme/tiny-lora", "--json")
    assert {m["rank"] for m in json.loads(r.stdout)["modules"]} == {16}
    r = run("inspect", "acme/tiny-lora", "--revision", "nope")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "HF_HUB_OFFLINE" in r.output, r.output
    # the Python API takes ids too
    assert load_adapter("acme/tiny-lora@v1").source == want.source
    # a local path wins over --revision: said, not silently (the stderr note; the JSON on stdout is unchanged)
    r = run("inspect", PEFT_FIXTURE, "--revision", "v1", "--json")
    assert r.exit_code == 0 and {m["rank"] for m in json.loads(r.stdout)["modules"]} == {16}
    assert f"note: {PEFT_FIXTURE}: a local path, read as it is (--revision v1 applies to Hub repo ids)" in r.stderr


def test_unknown_id_offline_and_local_paths_win(cache, tmp_path):
    r = run("squeeze", "acme/missing", "--rank", 2)
    assert r.exit_code == 1 and r.output.startswith("error: acme/missing: no such local path")
    assert r.output.count("\n") == 1
    # a local folder of the same name wins over the cached repo
    shutil.copytree(tmp_path / "r2", "acme/tiny-lora")
    r = run("inspect", "acme/tiny-lora", "--json")
    assert {m["rank"] for m in json.loads(r.stdout)["modules"]} == {2}


def test_outputs_never_go_into_the_cache(cache):
    inside = cache / "models--acme--tiny-lora" / "snapshots" / REV / "r2"
    r = run("squeeze", "acme/tiny-lora", "--rank", 2, "-o", inside)
    assert r.exit_code == 1 and "Hugging Face cache" in r.output and not inside.exists()


def test_compare_and_extract_take_ids(cache):
    r = run("compare", "acme/tiny-llama", "acme/tiny-lora", "acme/tiny-lora@v1", "--texts",
            FIXTURES / "sentences.txt", "--max-tokens", 16, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kl"] > 0
    assert run("merge", "acme/tiny-llama", "acme/tiny-lora", "-o", "merged").exit_code == 0
    r = run("extract", "merged", "acme/tiny-llama", "--rank", 4, "-o", "extracted")
    assert r.exit_code == 0, r.output


def test_resolve_keeps_local_paths_and_non_ids(tmp_path):
    assert resolve(str(tmp_path)) == str(tmp_path)
    assert resolve("/no/such/thing") == "/no/such/thing"  # not an id: the caller says it is missing


def test_online_download_asks_only_for_the_files_read(tmp_path, monkeypatch):
    """Not cached and online: huggingface_hub downloads, with the role's patterns (no .bin, no .pt)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    calls = []

    def fake(repo, *, local_files_only=False, **kwargs):
        calls.append((repo, local_files_only, kwargs))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if repo == "acme/gone":
            err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its HTTP response is not the point
            Exception.__init__(err, "404")
            raise err
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve("acme/model", "v2", role="model") == str(tmp_path)
    (_, first, kw1), (_, second, kw2) = calls
    assert first and not second and kw2["revision"] == "v2"
    assert "*.safetensors" in kw2["allow_patterns"] and not any("bin" in p for p in kw2["allow_patterns"])
    from surgery import SurgeryError

    with pytest.raises(SurgeryError, match="acme/gone: no such local path or Hugging Face repo"):
        resolve("acme/gone", role="adapter")


def online_from(snapshot, calls: list, monkeypatch) -> None:
    """Online, nothing cached: huggingface_hub's snapshot_download "downloads" `snapshot`, recording the patterns
    it was asked for in `calls`."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake(repo, *, local_files_only=False, **kwargs):
        calls.append(kwargs["allow_patterns"])
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_gguf_naming_downloads_only_the_base_s_config(tmp_path, monkeypatch):
    """convert --to gguf --base org/name reads only config.json (llama.cpp's names follow the architecture), so
    only the repo's JSON files are asked for, not its weights; other namings take the whole model."""
    pytest.importorskip("gguf")
    calls = []
    config_only = tmp_path / "snapshot"
    config_only.mkdir()
    shutil.copy(FIXTURES / "tiny-llama" / "config.json", config_only)

    online_from(config_only, calls, monkeypatch)
    r = run("convert", PEFT_FIXTURE, "--base", "acme/tiny-llama", "-o", tmp_path / "a.gguf")
    assert r.exit_code == 0, r.output
    assert calls == [["*.json"], ["*.json"]] and (tmp_path / "a.gguf").is_file()
    calls.clear()
    run("convert", PEFT_FIXTURE, "--to", "kohya", "--base", "acme/tiny-llama", "-o", tmp_path / "k.safetensors")
    assert calls and all("*.safetensors" in c for c in calls)


def test_a_file_or_folder_inside_a_repo(cache, tmp_path, monkeypatch):
    """Hub repos hold several LoRAs (a collection of styles, `checkpoint-500/` folders of one run): `org/name`
    alone gave "not a PEFT adapter directory" and nothing could name one of them. `org/name[@rev]/path` (as
    huggingface_hub's file system writes it) reads that file or folder, fetching only it; a default output is
    named after it in the current directory."""
    kohya = FIXTURES / "kohya-lora-tiny.safetensors"
    repo = tmp_path / "collection"
    (repo / "styles").mkdir(parents=True)
    shutil.copy(kohya, repo / "styles" / "ink.safetensors")
    shutil.copytree(PEFT_FIXTURE, repo / "checkpoint-500")
    hub_snapshot(repo, cache / "models--acme--collection", REV, "main")
    r = run("inspect", "acme/collection")
    assert r.exit_code == 1 and r.output.strip().endswith(
        "not a PEFT adapter directory (no adapter_model.safetensors); it holds checkpoint-500/: name one (after the "
        "repo id: org/name/<that path>)"), r.output
    shutil.copy(kohya, repo / "styles" / "oil.safetensors")  # a local folder of LoRA files
    r = run("inspect", repo / "styles")
    assert r.exit_code == 1 and r.output.strip().endswith("it holds ink.safetensors, oil.safetensors: name one")
    r = run("squeeze", "acme/collection/styles/ink.safetensors", "--rank", 4)
    assert r.exit_code == 0, r.output
    assert run("squeeze", kohya, "--rank", 4, "-o", tmp_path / "ref.safetensors").exit_code == 0
    assert (tmp_path / "work" / "ink-r4.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    r = run("squeeze", "acme/collection@main/checkpoint-500/", "--rank", 4)
    assert r.exit_code == 0 and (tmp_path / "work" / "checkpoint-500-r4" / "adapter_config.json").is_file(), r.output
    r = run("inspect", "acme/collection/styles/nope.safetensors")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not in the Hugging Face cache" in r.output
    # online: only that path is asked for; one the repo lacks is one line naming it
    calls = []
    online_from(repo, calls, monkeypatch)
    assert resolve("acme/other/styles/ink.safetensors", role="adapter") == str(repo / "styles" / "ink.safetensors")
    assert calls[-1][:2] == ["styles/ink.safetensors", "styles/ink.safetensors/*.json"]
    from surgery import SurgeryError

    with pytest.raises(SurgeryError, match="the Hugging Face repo acme/other has no styles/gone.safetensors"):
        resolve("acme/other/styles/gone.safetensors", role="adapter")
