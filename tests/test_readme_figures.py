"""README's "Reproduce LIMA's Figures 1 and 2": every command it gives exists and every option
it passes is one that command takes (the commands themselves need the paper's models and APIs)."""

import re
import shlex
from pathlib import Path

from limajax.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_command_and_option_of_the_section_exists():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Reproduce LIMA's Figures 1 and 2", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = 0
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("limajax "):
            continue
        words = shlex.split(line)
        group, name = main, words[1]
        command = group.commands[name]
        rest = words[2:]
        if hasattr(command, "commands"):  # `limajax data prepare`
            command, rest = command.commands[rest[0]], rest[1:]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        given = {re.sub("=.*", "", w) for w in rest if w.startswith("--")}
        assert given <= known, (line, sorted(given - known))
        commands += 1
    assert commands == 18  # every line of the block was read
