"""The formats people's data comes in (limajax/formats.py): the same dialogues written as GAIR,
Alpaca, ShareGPT and OpenAI messages prepare to the same token ids and loss masks; bad rows are
one line naming file and line, exit 2, nothing written."""

import json

import numpy as np
import pytest

from limajax import data, formats
from limajax.errors import UserError
from limajax.evaluation import judgments
from limajax.sampling import answers
from limajax.serving import Message, conversation

SYSTEM = "You are a careful assistant."
# (system, [user, assistant, ...], alpaca input): four dialogues, one with a system message,
# one with an Alpaca-style input, one of three exchanges, one with non-ASCII text.
DIALOGUES = [
    ("", ["Can brain cells move?", "Yes: neuroblasts migrate along the rostral stream."], ""),
    (SYSTEM, ["Summarise this.", "A short summary."], ""),
    ("", ["Translate to French.", "Bonjour, le monde."], "Hello, world."),
    ("", ["Name a prime.", "7.", "Another?", "11.", "And one more, élan, 東京?", "13."], ""),
]


def gair_turns(system, turns, input_):
    """What every format must come to: LIMA's turns, the system text and the input joined to
    the user turn they belong to (serve's rule; Stanford Alpaca's blank line)."""
    turns = list(turns)
    if input_:
        turns[-2] = f"{turns[-2]}\n\n{input_}"
    if system:
        turns[0] = f"{system}\n\n{turns[0]}"
    return turns


def as_gair(system, turns, input_):
    return {"conversations": gair_turns(system, turns, input_), "source": "demo"}


def as_alpaca(system, turns, input_):
    history = [[turns[k], turns[k + 1]] for k in range(0, len(turns) - 2, 2)]
    if system:  # Alpaca has no system field: it is part of the first instruction's text
        history = [[f"{system}\n\n{history[0][0]}", history[0][1]], *history[1:]] if history \
            else history
    instruction = turns[-2] if history or not system else f"{system}\n\n{turns[-2]}"
    row = {"instruction": instruction, "input": input_, "output": turns[-1], "source": "demo"}
    return row | ({"history": history} if history else {})


def as_sharegpt(system, turns, input_):
    turns = gair_turns("", turns, input_)
    conv = [{"from": "system", "value": system}] if system else []
    conv += [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(turns)]
    return {"id": "x", "conversations": conv, "source": "demo"}


def as_openai(system, turns, input_):
    turns = gair_turns("", turns, input_)
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]
    return {"messages": msgs, "source": "demo"}


WRITERS = {"gair": as_gair, "alpaca": as_alpaca, "sharegpt": as_sharegpt, "openai": as_openai}


def write(path, rows, as_array=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_array:  # pretty-printed, as alpaca_data.json is
        path.write_text(json.dumps(rows, indent=4, ensure_ascii=False))
    else:
        path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_four_formats_prepare_to_the_same_ids_and_loss_masks(tmp_path, cli, llama_tokenizer):
    prepared = {}
    for name, writer in WRITERS.items():
        rows = [writer(*d) for d in DIALOGUES]
        # Alpaca's and ShareGPT's files are usually one JSON array, the others JSON Lines.
        array = name in ("alpaca", "sharegpt")
        path = write(tmp_path / name / ("train.json" if array else "train.jsonl"), rows, array)
        result = cli("data", "prepare", "--input", path.parent,
                     "--output", tmp_path / f"{name}-out")
        assert result.exit_code == 0, result.output
        assert f"4 {name} rows" in result.output
        source = data.load(tmp_path / f"{name}-out", "train")
        records = [source[i] for i in range(len(source))]
        assert [r["source"] for r in records] == [b"demo"] * 4
        prepared[name] = [llama_tokenizer.encode_dialogue(data.conversations(r)) for r in records]
        assert [data.conversations(r) for r in records] == [gair_turns(*d) for d in DIALOGUES]
    for name in ("alpaca", "sharegpt", "openai"):
        for a, b in zip(prepared["gair"], prepared[name], strict=True):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    # --format insists on what was detected; the metadata says which format each file was.
    result = cli("data", "prepare", "--input", tmp_path / "openai" / "train.jsonl",
                 "--format", "openai", "--output", tmp_path / "insisted")
    assert result.exit_code == 0, result.output
    assert data.read_metadata(tmp_path / "insisted")["inputs"]["train.jsonl"]["format"] == "openai"


def test_llama_factory_lima_json_is_gairs_train_jsonl(fixtures, lima_rows):
    """The fixture's lima.json (Alpaca rows with LLaMA-Factory's history, one JSON array) reads
    as exactly the same dialogues as the GAIR-schema copy made from it."""
    dialogues = formats.read_dialogues(fixtures / "lima" / "lima_llamafactory.json")
    assert {d.format for d in dialogues} == {"alpaca"}
    assert [list(d.turns) for d in dialogues] == [r["conversations"] for r in lima_rows]
    assert dialogues[1].where.endswith("lima_llamafactory.json:" + str(dialogues[1].lineno))


def test_alpaca_template_is_stanfords_prompt():
    with_input, without = formats.templated(["Translate.", "Bonjour."], "alpaca", "Hello."), \
        formats.templated(["Say hi.", "Hi."], "alpaca")
    assert with_input == [
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nHello.\n\n### Response:", "Bonjour."]
    assert without[0] == ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
                          "### Response:")
    assert formats.templated(["Say hi.", "Hi."], "lima") == ["Say hi.", "Hi."]


def said(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


BAD = [
    ("gair", {"conversations": ["q", 7]}, "turn 1 is int, expected a string"),
    ("gair", {"conversations": []}, "empty dialogue"),
    ("alpaca", {"instruction": "q", "output": 3}, 'an Alpaca row needs "output" as a string'),
    ("alpaca", {"instruction": "q", "input": "", "output": "a", "history": [["only one"]]},
     '"history" must be a list of [user, assistant] string pairs'),
    ("sharegpt", {"conversations": said(("human", "q"), ("bot", "a"))},
     'conversations[1] needs "from" one of human, gpt, system, got \'bot\''),
    ("sharegpt", {"conversations": said(("gpt", "a"), ("human", "q"))},
     "turns must alternate user, assistant"),
    ("openai", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
     'messages[1] needs "content" as a string'),
    ("openai", {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
     "turn 1 is 'user'"),
    ("openai", {"question": "q", "answer": "a"}, "fits none of the formats"),  # first row: none
    ("gair", {"messages": [{"role": "user", "content": "q"}]},
     "this row is openai, the file's rows are gair (from line "),
    ("alpaca", {"conversations": ["q", "a"]}, "this row is gair, the file's rows are alpaca"),
]


@pytest.mark.parametrize("fmt, bad, message", BAD)
@pytest.mark.parametrize("as_array", [False, True])
def test_a_bad_row_is_one_line_with_file_and_line(tmp_path, cli, fmt, bad, message, as_array):
    first = WRITERS[fmt](*DIALOGUES[0])
    rows = [bad] if message.startswith("fits none") else [first, bad]
    path = write(tmp_path / "in" / ("train.json" if as_array else "train.jsonl"), rows, as_array)
    # the line the bad row starts on: in a pretty-printed array, the one after the first row's
    line = 2 if len(rows) == 2 else 1
    if as_array:
        line = len(json.dumps([first], indent=4).splitlines()) if len(rows) == 2 else 2
    result = cli("data", "prepare", "--input", path.parent, "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0
    assert f"{path}:{line}: " in result.stderr and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written


def test_format_given_and_not_met_names_the_line(tmp_path, cli):
    path = write(tmp_path / "train.jsonl", [as_gair(*DIALOGUES[0])])
    result = cli("data", "prepare", "--input", path, "--format", "sharegpt",
                 "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert f"{path}:1: this row is gair, but --format sharegpt was given" in result.stderr
    assert not (tmp_path / "out").exists()


def test_multi_turn_dialogues_in_or_out(tmp_path, cli, fixtures):
    # LIMA's copy without sources: the 29 dialogues of more than one exchange are LIMA §6's.
    splits, _ = data.read_gair_dir(fixtures / "lima")
    counts = {name: data.select(splits, data.PrepareOptions(sources=sources))[1]["examples"]
              for name, sources in (("all", None), ("without", ("-multi_turn",)),
                                    ("only", ("multi_turn",)))}
    assert counts == {"all": {"train": 1029}, "without": {"train": 1000}, "only": {"train": 29}}
    # On the command line, GAIR's own marking (source "multi_turn") and an excluded source.
    rows = [{"conversations": ["q1", "a1"], "source": "stackexchange"},
            {"conversations": ["q2", "a2", "q3", "a3"], "source": "multi_turn"},
            {"conversations": ["q4", "a4"], "source": "wikihow"}]
    gair = write(tmp_path / "gair" / "train.jsonl", rows).parent
    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "out",
                 "--sources=-multi_turn")
    assert result.exit_code == 0, result.output
    source = data.load(tmp_path / "out")
    assert [data.conversations(source[i])[0] for i in range(len(source))] == ["q1", "q4"]
    result = cli("data", "prepare", "--input", gair, "--output", tmp_path / "o2",
                 "--sources", "-reddit")
    assert result.exit_code == 2 and "no training rows from reddit" in result.stderr


def test_check_conversations_is_one_rule():
    assert formats.check_conversations(["q"], "f:1") == ["q"]
    with pytest.raises(UserError, match=r"^f:3: turn 0 is dict, expected a string$"):
        formats.check_conversations([{"from": "human"}], "f:3")


def test_sample_prompts_read_through_the_same_reader(tmp_path):
    """`sample --prompts` takes every format `data prepare` does: the prompts (the dialogues
    less their last answer, prompt_turns) and the ids are the same whichever it is written in;
    Alpaca rows need no output (AlpacaEval's prompts have only an instruction)."""
    want = [gair_turns(*d) for d in DIALOGUES]
    for name, writer in WRITERS.items():
        rows = [writer(*d) for d in DIALOGUES]
        rows = [{k: v for k, v in r.items() if k != "id"} for r in rows]
        path = write(tmp_path / f"{name}.json", rows, as_array=name == "alpaca")
        prompts = answers.read_prompts(path)
        assert [r["conversations"] for r in prompts] == want, name
        assert [r["id"] for r in prompts] == [d.lineno for d in formats.read_dialogues(path)]
        assert all(r["source"] == "demo" and set(FORMAT_FIELDS[name]).isdisjoint(r)
                   for r in prompts)
    alpaca_eval = write(tmp_path / "eval.json", [{"instruction": "Say hi.", "dataset": "x"}], True)
    assert answers.read_prompts(alpaca_eval, "alpaca") == [{
        "id": 2, "dataset": "x", "conversations": [formats.templated(["Say hi."], "alpaca")[0]]}]
    bad = write(tmp_path / "bad.jsonl", [as_gair(*DIALOGUES[0]), {"conversations": ["q", 7]}])
    with pytest.raises(UserError, match=rf"^{bad}:2: turn 1 is int, expected a string$"):
        answers.read_prompts(bad)


FORMAT_FIELDS = {"gair": (), "alpaca": ("instruction", "input", "output", "history"),
                 "sharegpt": (), "openai": ("messages",)}


def test_evaluation_and_serve_use_the_one_rules(tmp_path):
    """The evaluation's sample files are held to check_conversations, serve's messages to
    system_first (the rule data prepare trains by)."""
    path = write(tmp_path / "a.jsonl", [{"id": 1, "conversations": ["q", 3], "response": "r"}])
    with pytest.raises(UserError, match=rf"^{path}:1: turn 1 is int, expected a string$"):
        judgments.read_samples(str(path))
    said_ = [Message(role="system", content=SYSTEM), Message(role="user", content="Hi.")]
    assert conversation(said_) == formats.system_first(
        [("system", SYSTEM), ("user", "Hi.")], "messages") == [f"{SYSTEM}\n\nHi."]
    with pytest.raises(UserError, match="the last turn must be the user's"):
        conversation([Message(role="user", content="q"), Message(role="assistant", content="a")])
    with pytest.raises(UserError, match="turn 0 is 'assistant'"):
        conversation([Message(role="assistant", content="a")])
