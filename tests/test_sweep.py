"""Every command that writes, against outputs it cannot write: a read-only (immutable) folder, a folder that cannot
exist (a file stands where it should be) and a full disk (a real file-size limit, EFBIG, in a subprocess).

Each must exit 1 with one `error:` line naming the output, no traceback, nothing written and its inputs
byte-identical."""
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from surgery import load_adapter  # noqa: E402
from surgery.merge import merge  # noqa: E402
from surgery_cli.main import main  # noqa: E402

from .conftest import FIXTURES, KOHYA_FIXTURE, PEFT_FIXTURE, lora_pair, tree_digest, write_peft  # noqa: E402

BASE = FIXTURES / "tiny-llama"
BERT = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]

# name → the command line, with {i} the inputs folder and {o} the output path (a file name or a directory name)
COMMANDS = {
    "squeeze": "squeeze {i}/lora --rank 2 --device cpu -o {o}/out",
    "squeeze-file": "squeeze {i}/kohya.safetensors --rank 2 --device cpu -o {o}/out.safetensors",
    "convert-kohya": "convert {i}/lora --to kohya -o {o}/out.safetensors",
    "convert-tera": "convert {i}/lora --to tera --iters 2 -o {o}/out.safetensors",
    "merge": "merge {i}/base {i}/lora --device cpu -o {o}/out",
    "extract": "extract {i}/ft {i}/base --rank 2 --device cpu -o {o}/out",
    "init-tera": "init-tera {i}/base --targets q_proj -o {o}/out.safetensors",
    "capture": "capture {i}/minilm --texts {i}/texts.txt --max-tokens 40 --device cpu -o {o}/out.safetensors",
    "tune": "tune {i}/student --teacher {i}/teacher --activations {i}/acts.safetensors --steps 2 --device cpu "
            "-o {o}/out",
    "inspect-plot": "inspect {i}/lora --spectrum --plot {o}/out.png",
    "id-plot": "id {i}/hidden.safetensors --device cpu --plot {o}/out.png",
    "rerank": "rerank {i}/teacher --ids {i}/ids.json --device cpu -o {o}/out",
    "rerank-config": "rerank --ids {i}/ids.json --targets query,value --config-out {o}/out.json",
    "merge-pipeline": "merge {i}/pipe {i}/sd-kohya.safetensors --device cpu -o {o}/out",
    "convert-diffusers": "convert {i}/sd-kohya.safetensors --to diffusers --base {i}/pipe -o {o}/out.safetensors",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, minilm):
    """Everything the commands read, in one folder whose digest is checked after each failure."""
    d = tmp_path_factory.mktemp("inputs")
    shutil.copytree(PEFT_FIXTURE, d / "lora")
    shutil.copy(KOHYA_FIXTURE, d / "kohya.safetensors")
    shutil.copytree(BASE, d / "base")
    merge(d / "base", [load_adapter(d / "lora")], d / "ft", device="cpu")
    shutil.copytree(minilm, d / "minilm")
    from safetensors.torch import save_file

    from .diffusion_models import kohya_lora, linear_modules, save_pipeline, sd_unet, text_encoder

    unet, te = sd_unet(), text_encoder()
    save_pipeline(d / "pipe", {"unet": unet, "text_encoder": te})
    sd = kohya_lora(linear_modules(unet, "to_q"), "lora_unet_", 1)
    sd.update(kohya_lora(linear_modules(te, "q_proj"), "lora_te_", 2))
    save_file(sd, str(d / "sd-kohya.safetensors"))
    (d / "texts.txt").write_text((FIXTURES / "sentences.txt").read_text())
    pairs = {n: lora_pair(384, 384, 4, seed=i) for i, n in enumerate(BERT)}
    write_peft(d / "teacher", pairs, r=4, alpha=4)
    write_peft(d / "student", {n: lora_pair(384, 384, 2, seed=9 + i) for i, n in enumerate(BERT)}, r=2, alpha=2)
    for args in (f"capture {d}/minilm --texts {d}/texts.txt --max-tokens 200 --device cpu -o {d}/hidden.safetensors",
                 f"capture {d}/minilm --texts {d}/texts.txt --module-inputs --targets layer\\.0\\. --max-tokens 60 "
                 f"--device cpu -o {d}/acts.safetensors",
                 f"id {d}/hidden.safetensors --json --device cpu"):
        r = CliRunner().invoke(main, args.split())
        assert r.exit_code == 0, r.output
    (d / "ids.json").write_text(r.output)
    env = dict(os.environ, MPLCONFIGDIR=str(d.parent / "mpl"))  # matplotlib's font cache, built before any limit
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], env=env, check=True)
    return d


def test_every_command_works_when_it_can_write(inputs, tmp_path):
    """The control: each command line of the sweep succeeds on a writable output."""
    for name, line in COMMANDS.items():
        out = tmp_path / name
        r = CliRunner().invoke(main, line.format(i=inputs, o=out).split())
        assert r.exit_code == 0, (name, r.output)
        assert [p.name for p in out.iterdir()] == [Path(line.split()[-1]).name], name


def _read_only(folder: Path):
    """Make `folder` unwritable for real: immutable as root (chattr +i), mode 0555 otherwise."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    pytest.skip("root without chattr +i: no way to make a read-only folder")


def _check_failed(code, output, out: Path, inputs: Path, digest: str, name: str):
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 1, (name, output)
    assert "Traceback" not in output, (name, output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], (name, output)
    assert tree_digest(inputs) == digest, name


@pytest.mark.parametrize("name", COMMANDS)
def test_read_only_output_folder(inputs, tmp_path, name):
    folder = tmp_path / "ro"
    restore = _read_only(folder)
    digest = tree_digest(inputs)
    try:
        line = COMMANDS[name].format(i=inputs, o=folder)
        r = CliRunner().invoke(main, line.split())
        _check_failed(r.exit_code, r.output, Path(line.split()[-1]), inputs, digest, name)
        assert list(folder.iterdir()) == [], name
    finally:
        restore()


@pytest.mark.parametrize("name", COMMANDS)
def test_output_folder_that_cannot_exist(inputs, tmp_path, name):
    (tmp_path / "a-file").write_text("not a folder")
    digest = tree_digest(inputs)
    line = COMMANDS[name].format(i=inputs, o=tmp_path / "a-file")
    r = CliRunner().invoke(main, line.split())
    _check_failed(r.exit_code, r.output, Path(line.split()[-1]), inputs, digest, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], name


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # Python ignores SIGXFSZ: writes past it fail (EFBIG)


@pytest.mark.slow  # a whole process per command
@pytest.mark.parametrize("name", COMMANDS)
def test_full_output_disk(inputs, tmp_path, name):
    """A file-size limit makes every write past 200 bytes fail as a full disk does, in a real process."""
    folder = tmp_path / "full"
    folder.mkdir()
    digest = tree_digest(inputs)
    line = COMMANDS[name].format(i=inputs, o=folder)
    env = dict(os.environ, MPLCONFIGDIR=str(inputs.parent / "mpl"), PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, "-m", "surgery_cli.main", *line.split()], capture_output=True, text=True,
                       preexec_fn=_limit_file_size, env=env, timeout=300)
    _check_failed(p.returncode, p.stderr, Path(line.split()[-1]), inputs, digest, name)
    assert "wrote" not in p.stdout, name
    assert list(folder.iterdir()) == [], name
