"""`limajax train` from the command line: a short real run, and bad input -> one line, exit 2."""

import json

import pytest
import train_support as ts
from click.testing import CliRunner

from limajax.cli import main
from limajax.config import preset

TINY = str(ts.HERE.parents[1] / "configs" / "tiny.py")


def _train(*args):
    return CliRunner().invoke(main, ["train", "--config", TINY, "--no-progress", *args])


def test_train_command_runs_on_the_sample_data(tmp_path):
    # No --tokenizer: a random model on the sample data takes the sample data's own.
    r = _train("--workdir", str(tmp_path), "--epochs", "1", "--set", "data.max_len=128",
               "--peak-flops", "1e12")
    assert r.exit_code == 0, r.output
    assert "epoch 1/1: step 6" in r.stderr  # 48 sample dialogues / batch 8
    assert r.stderr.count("attention: xla (auto on cpu)") == 1  # the kernel, logged once
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"] == 513


def _fake_model_dir(path, config):
    path.mkdir()
    (path / "model.json").write_text(json.dumps(config.to_dict()))
    return str(path)


@pytest.mark.parametrize("case", ["mesh", "batch", "heads", "init", "set", "workdir",
                                  "kernel"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    workdir = tmp_path / "w"
    args = ["--workdir", str(workdir), "--tokenizer", str(ts.TOKENIZER)]
    expected = {
        "mesh": "mesh 2x2 needs 4 devices, found 8",
        "batch": "batch_size 6 does not divide across the data axis",
        "heads": "n_heads 2 does not divide across the model axis (4)",
        "init": "its model.json has n_layers = 4 but the recipe's model has 5",
        "set": "unknown key 'lr_max' in OptimConfig",
        "workdir": "holds another run's checkpoints (optim.",
        "kernel": "model.attention=cudnn: the cudnn kernel runs on gpu, not cpu",
    }[case]
    if case == "mesh":
        args += ["--mesh", "2x2"]
    elif case == "batch":
        args += ["--mesh", "4x2", "--set", "data.batch_size=6"]
    elif case == "heads":
        args += ["--set", "model.n_kv_heads=2", "--set", "model.n_heads=2"]
    elif case == "init":
        args += ["--init", _fake_model_dir(tmp_path / "m", preset("tiny"))]
    elif case == "set":
        args += ["--set", "optim.lr_max=1"]
    elif case == "kernel":
        args += ["--set", "model.attention=cudnn"]
    elif case == "workdir":
        workdir.mkdir()
        _train("--workdir", str(workdir), "--tokenizer", str(ts.TOKENIZER), "--set",
               "epochs=0")  # an invalid run writes nothing
        assert not (workdir / "config.json").exists()
        from limajax.config import load_recipe

        other = load_recipe(TINY).to_dict()
        other["optim"]["lr"] = 1.0
        (workdir / "config.json").write_text(json.dumps(other))
    r = _train(*args)
    assert r.exit_code == 2, r.output
    # One line for the error (a "notice: simulating N devices" line may precede it).
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("notice: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected in lines[0]


def test_train_from_a_converted_bfloat16_model(tmp_path):
    """--init: the real stories260K (converted to bfloat16, EOT added) fine-tunes in float32
    master weights and starts far below a random model's loss (ln 513 = 6.2)."""
    from limajax import convert

    stories = ts.FIXTURES / "stories260K"
    convert.convert("meta", stories / "meta_layout", tmp_path / "model",
                    tokenizer=stories / "tok512.model", dtype="bfloat16")
    r = _train("--workdir", str(tmp_path / "w"), "--init", str(tmp_path / "model"),
               "--set", "epochs=1", "--set", "data.max_len=128", "--peak-flops", "1e12")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["loss"] < 5.0


def test_train_says_how_many_dialogues_it_trims(tmp_path, monkeypatch):
    """LIMA §3 trims texts past max_len; train's summary line says how many of its dialogues
    that is (issue 17 item 8): here 3 of 16, each with an answer of over 200 words (at least a
    token each) where max_len is 128 and the others are a sentence each. The line comes before
    the loop, which is stubbed out: the other tests here train."""
    from limajax import data
    from limajax import train as train_lib

    monkeypatch.setattr(train_lib, "train", lambda *args, **kwargs: {})
    long = " ".join(["the little dog ran to the big red ball"] * 25)
    rows = [{"conversations": [q, long if i % 5 == 1 else a]}
            for i, (q, a) in enumerate(ts.DIALOGUES * 2)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data.prepare(tmp_path / "in", tmp_path / "data")
    r = _train("--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "data"),
               "--tokenizer", str(ts.TOKENIZER), "--epochs", "1", "--set", "data.max_len=128",
               "--peak-flops", "1e12")
    assert r.exit_code == 0, r.output
    assert "; 3 of 16 dialogues trimmed at 128 tokens (LIMA §3 keeps their beginning)" in r.stderr
