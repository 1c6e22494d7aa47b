"""`pip install limajax` without the `meta` extra: torch is absent, every command but the Meta
ones works, and those say in one line which extra to install. Proved in a subprocess where
torch cannot be imported (a meta-path blocker loaded by sitecustomize), not a fresh venv."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import train_support as ts

from limajax import convert

ROOT = Path(__file__).resolve().parents[1]

NO_TORCH = '''
import sys


class NoTorch:
    """torch is not installed (limajax without its `meta` extra)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTorch())
'''

# Every command, in one process (one JAX start-up), with its exit code and output.
DRIVER = '''
import json, sys
from click.testing import CliRunner
from limajax.cli import main

try:
    import torch  # noqa: F401
    sys.exit("torch is importable: the blocker did not load")
except ImportError:
    pass

out = {}
for name, args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    out[name] = [r.exit_code, r.output]
print(json.dumps(out))
'''


def test_every_command_but_metas_works_without_torch(tmp_path, fixtures):
    stories = fixtures / "stories260K"
    model = tmp_path / "model"  # made here, where torch is installed
    convert.convert("meta", stories / "meta_layout", model, tokenizer=stories / "tok512.model")
    (tmp_path / "texts.jsonl").write_text(json.dumps({"id": 1, "text": "Once upon a time"}) + "\n")
    t = str(tmp_path)
    tiny = ["--config", str(ROOT / "configs" / "tiny.py"), "--mesh", "1x1"]
    commands = [
        ("help", ["--help"]),
        ("convert meta", ["convert", "--from", "meta", "--input", str(stories / "meta_layout"),
                          "--tokenizer", str(stories / "tok512.model"), "--output", f"{t}/m"]),
        ("export meta", ["export", "--to", "meta", "--model", str(model), "--output", f"{t}/x"]),
        ("export hf", ["export", "--to", "hf", "--model", str(model), "--output", f"{t}/hf"]),
        ("convert hf", ["convert", "--from", "hf", "--input", f"{t}/hf", "--output", f"{t}/m2"]),
        ("data prepare", ["data", "prepare", "--output", f"{t}/data"]),
        ("data inspect", ["data", "inspect", "--data", f"{t}/data", "--tokenizer", str(model)]),
        ("score", ["score", "--model", f"{t}/m2", "--input", f"{t}/texts.jsonl", "--output",
                   f"{t}/scores.jsonl"]),
        ("train", ["train", *tiny, "--init", str(model), "--data", f"{t}/data", "--workdir",
                   f"{t}/run", "--set", "epochs=1", "--set", "data.max_len=64", "--set",
                   "data.batch_size=32", "--no-progress", "--peak-flops", "1e12"]),
        ("plan", ["plan", *tiny, "--seq-len", "64", "--device-memory", "1GiB"]),
        ("sample", ["sample", "--model", f"{t}/m2", "--prompt", "Once upon a time", "--raw",
                    "--greedy", "--max-new-tokens", "8"]),
        ("export epoch", ["export", "--to", "hf", "--workdir", f"{t}/run", "--epoch", "1",
                          "--output", f"{t}/hf-e1"]),
    ]
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(textwrap.dedent(NO_TORCH))
    # train and plan compile the same step: the second is a cache read
    env = ts.subprocess_env(PYTHONPATH=os.pathsep.join([str(tmp_path / "blocker"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("convert meta", "export meta"):
        code, output = results.pop(name)
        assert code == 2, output
        [line] = output.strip().splitlines()  # one line, no traceback
        assert 'pip install "limajax[meta]"' in line
    for name, (code, output) in results.items():
        assert code == 0, f"{name}: {output}"
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()
    assert (tmp_path / "hf-e1" / "model.safetensors").is_file()


def test_the_wheel_carries_what_demo_and_a_sample_run_need(tmp_path):
    """`limajax demo` and `limajax train --config configs/tiny.py` on the sample data work from
    an installed package: the recipe and the sample data's tokenizer ship in the wheel."""
    import zipfile

    from limajax import data, demo

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("limajax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = Path(data.__file__).parents[1]
    for path in (demo.RECIPE, data.SAMPLE_TOKENIZER):
        assert str(path.relative_to(package.parent)) in names
    assert (ROOT / "configs" / "tiny.py").resolve() == demo.RECIPE.resolve()
