"""Preparing LIMA as a TFDS dataset, inspecting it, and the errors a person gets for bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from limajax import data


def write_gair(directory, split, rows):
    directory.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_prepare_keeps_every_real_dialogue_and_every_turn(lima_dataset, lima_rows):
    source = data.load(lima_dataset, "train")
    assert len(source) == len(lima_rows) == 1029
    for i, row in enumerate(lima_rows):
        record = source[i]
        assert record["id"].decode() == f"train-{i + 1:05d}"  # the input file's line number
        assert data.conversations(record) == row["conversations"]
        # The copy lost GAIR's sources; LIMA §6's dialogues (lines 1001-1029, the only ones of
        # more than one exchange) get GAIR's name for them back, for --sources=-multi_turn.
        multi = len(row["conversations"]) > 2
        assert record["source"].decode() == ("multi_turn" if multi else row["source"])
        assert multi == (i >= 1000)
    assert sum(len(r["conversations"]) > 2 for r in lima_rows) == 29  # multi-turn, all kept
    meta = data.read_metadata(lima_dataset)
    # The checksum of the input is recorded (fixture README gives this sha256).
    assert meta["inputs"]["train.jsonl"]["sha256"] == (
        "f3075cdda491a890e6a91fefd1487522330425f04353cbbc4578f7f5be959c0b"
    )
    assert meta["examples"] == {"train": 1029}
    assert data.dataset_dir(lima_dataset).name == "1.0.0"
    assert data.split_names(lima_dataset) == ["train"]


def test_inspect_counts_equal_a_direct_sentencepiece_count(lima_dataset, lima_rows,
                                                           llama_tokenizer_file, cli):
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_file))
    lengths, loss = [], 0
    for row in lima_rows:  # BOS, then each turn and its EOT; loss on odd (assistant) turns
        pieces = [len(sp.encode(t)) + 1 for t in row["conversations"]]
        lengths.append(1 + sum(pieces))
        flags = [0] + [f for k, n in enumerate(pieces) for f in [k % 2] * n]
        loss += sum(flags[:2048])
    lengths = np.array(lengths)

    result = cli("data", "inspect", "--data", lima_dataset, "--tokenizer", llama_tokenizer_file)
    assert result.exit_code == 0, result.output
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
    trimmed = int((lengths > 2048).sum())
    kept = int(np.minimum(lengths, 2048).sum())
    assert "train: 1,029 dialogues" in result.output
    assert "turns:   2 x1,000, 4 x15, 6 x10, 8 x3, 20 x1" in result.output
    assert f"p50 {p50:,}  p90 {p90:,}  p99 {p99:,}  max {lengths.max():,}" in result.output
    assert f"trimmed at 2048: {trimmed:,} (" in result.output and trimmed > 0
    assert f"tokens after trimming: {kept:,}; carrying loss: {loss:,} (" in result.output
    assert "2049-4096" in result.output  # the text histogram


def test_inspect_plot_and_train_on_prompts(lima_dataset, llama_tokenizer_file, tmp_path, cli):
    from limajax.tokenizer import Tokenizer

    tok = Tokenizer.from_path(llama_tokenizer_file)
    [assistant] = data.inspect(lima_dataset, tok)
    [everything] = data.inspect(lima_dataset, tok, train_on_prompts=True)
    assert everything.loss_tokens == everything.tokens - everything.examples  # all but BOS
    assert assistant.loss_tokens < everything.loss_tokens
    result = cli("data", "inspect", "--data", lima_dataset, "--tokenizer", llama_tokenizer_file,
                 "--plot", tmp_path / "lengths.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "length histogram" not in result.output


def test_splits_odd_turns_and_metadata(tmp_path, cli):
    gair = tmp_path / "gair"
    write_gair(gair, "train", [
        {"conversations": ["q1", "a1"], "source": "stackexchange"},
        {"conversations": ["q2", "a2", "unanswered"], "source": "multi_turn"},
        {"conversations": ["only a prompt"], "source": "wikihow"},
        "",  # blank lines are fine
        {"conversations": ["q3", "a3"]},  # no source: "unknown"
    ])
    write_gair(gair, "test", [{"conversations": ["a test prompt"], "source": "AskReddit"}])
    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "dropped 2 unanswered last user turns; skipped 1" in result.output
    train, test = data.load(tmp_path / "out", "train"), data.load(tmp_path / "out", "test")
    assert [data.conversations(train[i]) for i in range(len(train))] == [
        ["q1", "a1"], ["q2", "a2"], ["q3", "a3"]
    ]
    assert [train[i]["source"] for i in range(3)] == [b"stackexchange", b"multi_turn", b"unknown"]
    assert data.conversations(test[0]) == ["a test prompt"]  # test prompts keep their one turn
    meta = data.read_metadata(tmp_path / "out")
    assert meta["inputs"]["train.jsonl"]["trailing_user_turns_dropped"] == 2
    assert meta["examples"] == {"train": 3, "test": 1}


def test_subsets_for_the_ablations_are_seeded_and_recorded(tmp_path, cli):
    rows = [{"conversations": [f"q{i}", f"a{i}"], "source": "se" if i % 3 else "wikihow"}
            for i in range(30)]
    gair = write_gair(tmp_path / "gair", "train", rows)

    def prepare(name, *flags):
        result = cli("data", "prepare", "--input", gair, "--output", tmp_path / name, *flags)
        assert result.exit_code == 0, result.output
        load = data.load
        return {split: [data.conversations(s[i])[0] for i in range(len(s))]
                for split in data.split_names(tmp_path / name)
                for s in [load(tmp_path / name, split)]}

    a = prepare("a", "--dev-from-train", 5, "--seed", 3)
    assert len(a["dev"]) == 5 and len(a["train"]) == 25
    assert sorted(a["dev"] + a["train"]) == sorted(f"q{i}" for i in range(30))
    assert prepare("b", "--dev-from-train", 5, "--seed", 3) == a  # same seed, same split
    assert prepare("c", "--dev-from-train", 5, "--seed", 4)["dev"] != a["dev"]

    d = prepare("d", "--dev-from-train", 5, "--seed", 3, "--sources", "wikihow", "--sample", 4)
    assert d["dev"] == a["dev"]  # the dev set does not depend on the training subset
    assert len(d["train"]) == 4 and set(d["train"]) < {f"q{i}" for i in range(0, 30, 3)}
    meta = data.read_metadata(tmp_path / "d")
    assert meta["options"] == {"dev_from_train": 5, "seed": 3, "sample": 4,
                               "sources": ["wikihow"], "format": None, "template": "lima"}
    assert meta["examples"] == {"train": 4, "dev": 5}

    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "e",
                 "--sources", "reddit")
    assert result.exit_code == 2 and "present: se (20), wikihow (10)" in result.output
    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "f", "--sample", 31)
    assert result.exit_code == 2 and "--sample 31" in result.output


BAD_LINES = [
    ('{"conversations": ["q", "a"]', "train.jsonl:2: not valid JSON"),
    ('{"source": "x"}', 'train.jsonl:2: no "conversations" field'),
    ('{"conversations": []}', "train.jsonl:2: empty dialogue"),
    ('{"conversations": ["q", 7]}', "train.jsonl:2: turn 1 is int, expected a string"),
    ('{"conversations": "q"}', 'train.jsonl:2: "conversations" must be a list'),
    ('["q", "a"]', "train.jsonl:2: expected a JSON object"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_input_line_is_one_line_exit_2_and_no_output(tmp_path, line, message, cli):
    gair = write_gair(tmp_path / "gair", "train", ['{"conversations": ["q", "a"]}', line])
    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert str(gair / "train.jsonl") in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gair"]  # nothing half-written


def test_missing_inputs_and_existing_output(tmp_path, cli):
    result = cli("data", "prepare", "--input", tmp_path / "nowhere", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "no such file or directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = cli("data", "prepare", "--input", tmp_path / "empty", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "no train.jsonl" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

    gair = write_gair(tmp_path / "gair", "train", [{"conversations": ["q", "a"]}])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "taken")
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]

    result = cli("data", "inspect", "--data", tmp_path / "empty", "--tokenizer", "x.model")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


def test_an_empty_output_directory_is_filled(tmp_path, cli):
    gair = write_gair(tmp_path / "gair", "train", [{"conversations": ["q", "a"]}])
    (tmp_path / "out").mkdir()
    assert cli("data", "prepare", "--input", gair, "--output", tmp_path / "out").exit_code == 0
    assert len(data.load(tmp_path / "out")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gair", "out"]


def test_the_embedded_sample_is_the_default_input(tmp_path, cli):
    lines = {split: (data.SAMPLE_DATA / f"{split}.jsonl").read_text().splitlines()
             for split in ("train", "test")}
    result = cli("data", "prepare", "--output", tmp_path / "sample")
    assert result.exit_code == 0, result.output
    assert f"train: {len(lines['train'])}, test: {len(lines['test'])}" in result.output
    for split in ("train", "test"):
        source = data.load(tmp_path / "sample", split)
        assert [data.conversations(source[i]) for i in range(len(source))] == [
            json.loads(line)["conversations"] for line in lines[split]
        ]


def test_a_corrupted_dataset_is_caught_before_the_first_step(tmp_path, cli):
    """64 bytes flipped in a prepared ArrayRecord file: train and data inspect name the file in
    one line from the checksums `prepare` recorded (not a Riegeli traceback after a step), exit
    2, and train leaves no workdir (issue 17 item 5)."""
    out = tmp_path / "data"
    assert cli("data", "prepare", "--output", out).exit_code == 0
    train_file = next((out / "lima" / "1.0.0").glob("lima-train.array_record-*"))
    data = bytearray(train_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    train_file.write_bytes(bytes(data))
    repo = Path(__file__).resolve().parents[1]
    tokenizer = repo / "limajax" / "sample_data" / "tokenizer.model"
    for args in (["train", "--config", repo / "configs" / "tiny.py", "--data", out, "--workdir",
                  tmp_path / "w", "--tokenizer", tokenizer, "--no-progress"],
                 ["data", "inspect", "--data", out, "--tokenizer", tokenizer]):
        r = cli(*args)
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
        assert errors[0].startswith(f"error: {train_file}: its sha256 is not the one")
    assert not (tmp_path / "w").exists()
