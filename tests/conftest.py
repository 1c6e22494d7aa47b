"""Test set-up: 8 simulated CPU devices, set before JAX starts (DESIGN §5), and the fixtures
several test files share."""

import json
import os

# train_support imports jax but starts no backend: XLA_FLAGS is read when one starts.
from train_support import FIXTURES, xla_flags

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from limajax import data  # noqa: E402
from limajax.cli import main  # noqa: E402
from limajax.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def fixtures():
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES} (../shared/fixtures beside the checkout)")
    return FIXTURES


@pytest.fixture(scope="session")
def llama_tokenizer_file(fixtures):
    """The real LLaMA-1/2 SentencePiece model (32,000 pieces)."""
    return fixtures / "llama_tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_file):
    return Tokenizer.from_path(llama_tokenizer_file)


@pytest.fixture(scope="session")
def lima_rows(fixtures):
    """GAIR's 1,029 real training rows, as JSON objects."""
    with open(fixtures / "lima" / "train.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def lima_dataset(fixtures, tmp_path_factory):
    """The real training dialogues, prepared once per test session."""
    out = tmp_path_factory.mktemp("lima") / "data"
    data.prepare(fixtures / "lima", out)
    return out


@pytest.fixture(scope="session")
def cli():
    """Run `limajax ARGS...` in-process: cli("convert", "--from", ...) -> click's Result."""
    return lambda *args: CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="session")
def stories(fixtures, tmp_path_factory):
    """stories260K (a real trained model) converted from Meta's layout into `model/` and
    exported for transformers into `hf/`, once per session."""
    root = tmp_path_factory.mktemp("stories")
    src = fixtures / "stories260K"
    result = CliRunner().invoke(main, [
        "convert", "--from", "meta", "--input", str(src / "meta_layout"),
        "--tokenizer", str(src / "tok512.model"), "--output", str(root / "model")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["export", "--to", "hf", "--model", str(root / "model"),
                                       "--output", str(root / "hf")])
    assert result.exit_code == 0, result.output
    return root


STORIES_CONTEXT = 512  # tokens per decode slot of the stories260K server (its context)


@pytest.fixture(scope="session")
def stories_engine(stories):
    """The continuous-batching engine over stories260K, 8 slots of its 512-token context."""
    from limajax import sharding
    from limajax.checkpoint import load_for_inference
    from limajax.sampling import Engine

    mesh = sharding.single_device_mesh()
    model, tokenizer = load_for_inference(stories / "model", mesh)
    engine = Engine(model, tokenizer, mesh, max_batch=8, cache_length=STORIES_CONTEXT)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def stories_server(stories_engine):
    """limajax's own `serve` of stories260K on a free loopback port (the serving tests, and the
    judge client's test against a real, noisy judge); yields the OpenAI base URL (.../v1)."""
    from limajax.serving import running

    with running(stories_engine, "stories") as url:
        yield url


# AutoTokenizer in a Python where sentencepiece and protobuf cannot be imported, as in a fresh
# `pip install transformers` (or vLLM, TGI): only tokenizer.json can load there.
_AUTOTOKENIZER = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = json.load(open(sys.argv[2]))
roles = ("user", "assistant")
out = [tok.apply_chat_template([{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
                               tokenize=True)["input_ids"] for turns in rows]
json.dump(out, open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="session")
def autotokenizer_ids(tmp_path_factory):
    """autotokenizer_ids(EXPORT_DIR, dialogues) -> the ids transformers' AutoTokenizer gives each
    dialogue through the export's chat template, loaded where sentencepiece and google.protobuf
    are not installed: a site-packages of links to this one's entries less those two, run with
    `python -S` so nothing else is found."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    site = tmp_path_factory.mktemp("site_without_sentencepiece")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(("sentencepiece", "protobuf")) or entry.suffix == ".pth":
            continue
        if name == "google":  # a namespace package: all of it but google.protobuf
            (site / "google").mkdir()
            for sub in entry.iterdir():
                if sub.name != "protobuf":
                    (site / "google" / sub.name).symlink_to(sub)
        else:
            (site / entry.name).symlink_to(entry)

    def run(directory, dialogues):
        work = tmp_path_factory.mktemp("autotokenizer")
        (work / "rows.json").write_text(json.dumps(dialogues))
        subprocess.run([sys.executable, "-S", "-c", _AUTOTOKENIZER, str(directory),
                        str(work / "rows.json"), str(work / "ids.json")], check=True,
                       env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
        return json.loads((work / "ids.json").read_text())

    return run
