"""The command line only parses (issue 18): a mistake in a command's options is one line like a
UserError (issue 17), no command imports a library module before it starts the devices, and the
summaries the commands print are the library's, testable without click."""

import subprocess
import sys

import pytest

from limajax.evaluation import rate, selection


@pytest.mark.parametrize("args, option", [
    (["plan", "--seq-len", "-5"], "--seq-len"),  # out of its range (the newcomer trial)
    (["data", "inspect", "--data", "d", "--tokenizer", "t", "--max-len", "-1"], "--max-len"),
    (["train", "--workdir", "w"], "--config"),  # a required option missing
    (["score", "--bogus"], "--bogus"),  # an unknown option
])
def test_a_bad_option_is_one_line(cli, args, option):
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith("error: ") and option in r.stderr, r.stderr


def test_help_and_commands_stay_clicks(cli):
    assert cli("plan", "--help").exit_code == 0 and "Usage:" in cli("plan", "--help").output
    r = cli("data")  # a group without its command: its help
    assert "prepare" in r.output and "inspect" in r.output
    r = cli("frobnicate")  # an unknown command: click's usage, which names where to look
    assert r.exit_code == 2 and "Usage:" in r.output and "No such command" in r.output


# Stands in for limajax.sharding: at start() it prints the library modules already loaded
# (and whether JAX is), then stops the command.
PROBE = """
import sys, types
fake = types.ModuleType("limajax.sharding")
def start(*args):
    print(sorted(m for m in sys.modules if m == "jax" or m.startswith("limajax.")
                 and not m.startswith(("limajax.cli", "limajax.sharding"))))
    sys.exit(0)
fake.start = start
sys.modules["limajax.sharding"] = fake
from limajax.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("args", [
    ["score", "--model", "m", "--input", "i", "--output", "o"],
    ["sample", "--model", "m", "--prompt", "hi"],
    ["chat", "--model", "m"],
    ["serve", "--model", "m"],
    ["select", "--workdir", "w", "--prompts", "p", "--judge-url", "u", "--judge-model", "j"],
    ["demo", "--workdir", "w"],
])
def test_devices_start_before_any_library_module(args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout))
    # errors: the cli's own; the demo's recipe is a config (which sharding imports anyway)
    assert loaded <= {"limajax.errors", "limajax.config", "limajax.sample_data",
                      "limajax.sample_data.tiny"}, loaded


def test_rate_says_nothing_was_read_rather_than_a_share():
    s = {**rate.summarize([{"rating": "unparsed"}] * 3, "grade"), "judged": 3}
    line = rate.format_summary(s, "r.jsonl")
    assert "no grade read" in line and "%" not in line and "unparsed 3" in line, line
    s = {**rate.summarize([{"id": "a", "rating": "unparsed"}], "scale"), "judged": 1}
    assert "no rating" in rate.format_summary(s, "r.jsonl")
    s = {**rate.summarize([{"rating": g} for g in ("Pass", "Fail", "Pass", "Excellent")],
                          "grade"), "judged": 4}
    assert "Fail 1 (25%), Pass 2 (50%), Excellent 1 (25%)" in rate.format_summary(s, "r")


def test_rate_per_turn_without_a_read_conversation_shows_no_share():
    rows = [{"id": "c", "sample": 1, "rating": "Pass"}, {"id": "c", "sample": 2,
                                                        "rating": "unparsed"}]
    s = {**rate.summarize(rows, "grade"), "judged": 2, "per_turn": rate.by_turn(rows)}
    turns = rate.format_summary(s, "r").splitlines()[1:]
    assert turns[0].endswith("through turn 1: 1/1 (100%, 95% 100-100%)"), turns
    assert turns[1].endswith("through turn 2: -"), turns


def test_select_names_the_epochs_it_could_not_judge():
    s = {"ranking": [{"epoch": 2, "score": 0.75, "judged": True, "perplexity": 3.5},
                     {"epoch": 1, "score": None, "judged": False, "perplexity": 3.0}],
         "score": "share won", "chosen_by": "score", "best": 2, "selection_json": "s.json"}
    assert selection.format_summary(s).splitlines() == [
        "epoch 2: 0.750, perplexity 3.50", "epoch 1: not judged, perplexity 3.00",
        "best: epoch 2 (share won) -> s.json"]
