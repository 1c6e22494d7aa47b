"""Configs: derived sizes follow their inputs (review R1), and a recipe file's mistakes are one
line naming the file and line, exit 2 (newcomer F7)."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from limajax.cli import main
from limajax.config import ModelConfig, apply_overrides, load_recipe, preset
from limajax.errors import UserError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def test_replace_derives_sizes_again():
    config = ModelConfig(dim=64, n_layers=2, n_heads=8)
    wider = config.replace(dim=128)
    assert wider == ModelConfig(dim=128, n_layers=2, n_heads=8)
    assert (wider.head_dim, wider.ffn_dim) == (16, 512)
    more_heads = config.replace(n_heads=16)
    assert more_heads.n_kv_heads == 16  # full attention stays full attention
    # A preset that states a size keeps it: tiny's 4 K/V heads are grouped-query on purpose.
    assert preset("tiny").replace(n_heads=16).n_kv_heads == 4
    # A size given explicitly (HF's intermediate_size) is kept too.
    assert ModelConfig(dim=64, n_layers=2, n_heads=8, ffn_dim=100).replace(dim=128).ffn_dim == 100


def test_set_derives_sizes_again_and_a_broken_override_is_one_line():
    config = apply_overrides(load_recipe(TINY), ["model.dim=128"])
    assert config.model == load_recipe(TINY).model.replace(dim=128)
    assert (config.model.head_dim, config.model.ffn_dim) == (16, 344)
    with pytest.raises(UserError, match=r"--set model.n_heads=7: model config: dim 64 is not "
                       "divisible by n_heads 7"):
        apply_overrides(load_recipe(TINY), ["model.n_heads=7"])


@pytest.mark.parametrize("body, line, words", [
    ("config = TrainConfig(\n    model=ModelConfig(dim=64, n_layers=2, n_heads=8, "
     "n_kv_head=4))\n", 3, "TypeError: ModelConfig.__init__() got an unexpected keyword"),
    ("config = TrainConfig(\n    model='tiny'\n    epochs=2)\n", 3, "invalid syntax"),
    ("config = TrainConfig(\n    model='tiny',\n    optim=OptimConfig(lr='3e-3'))\n", 4,
     "optim: lr must be float, got '3e-3'"),
    ("config = TrainConfig(model='tiny', epochs=0)\n", 2, "epochs must be positive"),
])
def test_a_broken_recipe_is_one_line_with_file_and_line(tmp_path, body, line, words):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from limajax.config import ModelConfig, OptimConfig, TrainConfig\n" + body)
    r = CliRunner().invoke(main, ["plan", "--config", str(recipe)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}:{line}: "), r.stderr
    assert words in lines[0]


def test_every_option_has_help():
    import click

    def options(cmd, name):
        if isinstance(cmd, click.Group):
            for sub, c in cmd.commands.items():
                yield from options(c, f"{name} {sub}")
        else:
            yield from ((name, p.opts) for p in cmd.params
                        if isinstance(p, click.Option) and not p.help)

    assert list(options(main, "limajax")) == []


def _every_option(cmd=main, name="limajax"):
    import click

    if isinstance(cmd, click.Group):
        for sub, c in cmd.commands.items():
            yield from _every_option(c, f"{name} {sub}")
    else:
        yield from ((name, p) for p in cmd.params if isinstance(p, click.Option))


def test_every_number_option_has_a_range_and_every_switch_its_default():
    """An integer option takes a bounded range (a negative --max-len printed negative
    percentages; a zero --batch-size failed later), seeds excepted: any integer seeds; a
    --x/--no-x switch shows its default in --help."""
    import click

    unbounded = [(name, p.opts) for name, p in _every_option()
                 if p.type is click.INT and p.name != "seed"]
    assert unbounded == []
    hidden = [(name, p.opts) for name, p in _every_option()
              if p.secondary_opts and not p.show_default]
    assert hidden == []
    from click.testing import CliRunner

    r = CliRunner().invoke(main, ["data", "inspect", "--data", "d", "--tokenizer", "t",
                                  "--max-len", "-1"])
    assert r.exit_code == 2 and "'--max-len': -1 is not in the range x>=1" in r.output, r.output
