"""Inference stands apart from training (issue 18): the library modules behind score, sample,
chat and serve never import TFDS, grain or the training loop, and every command that places a
model on a mesh names the dimensions that mesh replicates (review R3, "never silent")."""

import subprocess
import sys

import pytest
import uvicorn

from limajax import serving

INFERENCE = ("limajax.perplexity", "limajax.sampling.answers", "limajax.chat", "limajax.serving")
TRAINING_ONLY = ("tensorflow_datasets", "grain", "limajax.train", "limajax.data")


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_imports_no_training(module):
    code = (f"import sys, {module}; print(sorted(m for m in {TRAINING_ONLY!r} "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", f"{module} loads {out.strip()}"


# stories260K has 4 K/V heads: a model axis of 8 cannot split them, so they are replicated.
NOTICE = "over model (8) does not divide"


def test_sample_and_chat_name_replicated_dims(cli, stories):
    model = stories / "model"
    result = cli("sample", "--model", model, "--prompt", "Once", "--mesh", "1x8",
                 "--max-new-tokens", "2", "--raw", "--greedy")
    assert result.exit_code == 0, result.output
    assert NOTICE in result.stderr and "replicated" in result.stderr
    result = cli("chat", "--model", model, "--mesh", "1x8")  # no input: ends at once
    assert result.exit_code == 0, result.output
    assert NOTICE in result.stderr and "replicated" in result.stderr


def test_serve_names_replicated_dims(stories, monkeypatch, capfd):
    class Stopped(Exception):
        pass

    class Server:  # a server stopped as soon as it starts: the notices come before it
        def run(self):
            raise Stopped

    # uvicorn's Config would bind its loggers to the captured stderr, which outlives the test.
    monkeypatch.setattr(uvicorn, "Config", lambda *args, **kwargs: None)
    monkeypatch.setattr(serving, "announcing_server", lambda config, announce: Server())
    with pytest.raises(Stopped):
        serving.serve(str(stories / "model"), mesh_spec="1x8", port=0, no_auth=True)
    err = capfd.readouterr().err
    assert NOTICE in err and "replicated" in err
