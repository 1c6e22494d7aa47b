"""`limajax chat` on the real stories260K model: commands, streaming, history in the dialogue
format, and the oldest turns dropped when the history outgrows the context."""

import pytest
from click.testing import CliRunner

from limajax.chat import change, fit
from limajax.cli import main
from limajax.errors import UserError
from limajax.sampling import Settings
from limajax.tokenizer import Tokenizer


def test_a_conversation_with_commands(stories):
    lines = ["Tell me a story.", "/settings", "/settings temperature=0 max_new_tokens=12",
             "And another one?", "/settings top_p=0", "/reset", "/nope", "/exit", "Never read."]
    result = CliRunner().invoke(main, ["chat", "--model", str(stories / "model"),
                                       "--max-new-tokens", 20], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("lima> ") == 2  # nothing after /exit
    assert "settings: temperature=0.7, top_p=0.9, repetition_penalty=1.2, max_new_tokens=20" in out
    assert "temperature=0.0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=12, greedy=True" \
        in out
    assert "error: top-p must be in (0, 1], got 0.0" in out
    assert "(the conversation is forgotten)" in out and "unknown command /nope" in out
    answers = [line[len("lima> "):] for line in out.splitlines() if line.startswith("lima> ")]
    assert all(answers), out


def test_the_oldest_turns_are_dropped_when_the_history_outgrows_the_context(stories):
    tok = Tokenizer.from_path(stories / "model")
    turns = ["Hello there.", "Hi! How can I help?", "Tell me about cats.", "Cats purr.",
             "And dogs?"]
    whole = tok.encode_prompt(turns)
    assert fit(tok, turns, len(whole) + 10, 10) == (whole, 0)
    ids, dropped = fit(tok, turns, len(whole) + 9, 10)  # one token short: the first exchange goes
    assert dropped == 2 and ids == tok.encode_prompt(turns[2:])
    assert fit(tok, turns, len(tok.encode_prompt(turns[4:])) + 10, 10)[1] == 4
    with pytest.raises(UserError, match="that message: this model's maximum context"):
        fit(tok, turns, 12, 10)


def test_settings_changes_are_checked():
    s = change(Settings(), ["greedy=true"])
    assert s.greedy and s.repetition_penalty == 1.0
    with pytest.raises(UserError, match="NAME=VALUE"):
        change(Settings(), ["colour=blue"])
    with pytest.raises(UserError, match="not a number"):
        change(Settings(), ["top_p=high"])


def test_ctrl_c_at_the_prompt_keeps_the_conversation_and_settings_say_what_follows(stories):
    """Ctrl-C at `you>` once quit chat and lost the conversation; `/settings temperature=0`
    switched greedy and the penalty without a word (issue 17 item 10)."""
    from limajax.chat import chat

    said = []
    lines = iter(["Tell me a story.", KeyboardInterrupt, "/settings temperature=0",
                  "And then?", "/exit"])

    def read(prompt):
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    chat(str(stories / "model"), Settings(max_new_tokens=6), read=read, write=said.append)
    out = "".join(said)
    assert "(Ctrl-C stops an answer; /exit or Ctrl-D quits)" in out
    assert out.count("lima> ") == 2  # the conversation went on after the Ctrl-C
    assert ("(this also sets repetition_penalty=1.0, greedy=True: temperature 0 means greedy, "
            "and greedy's default repetition penalty is 1.0)") in out
