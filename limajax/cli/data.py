"""`limajax data prepare` / `inspect`: GAIR JSONL -> TFDS dataset, and what is in it."""

import click

from limajax import cli


@cli.main.group()
def data():
    """Prepare LIMA's dialogues (GAIR's JSONL) as a TFDS dataset, and inspect one."""


@data.command("prepare")
@click.option("--input", "input_dir", type=click.Path(path_type=str), default=None,
              help="Directory with train.jsonl (+ optional test.jsonl, dev.jsonl; .json too), "
              "or one training file (e.g. alpaca_data.json). Default: the sample dialogues "
              "shipped with limajax.")
@click.option("--format", "fmt", type=click.Choice(["gair", "alpaca", "sharegpt", "openai"]),
              default=None,
              help="Insist on this input format; default: detected (each file keeps to one).")
@click.option("--template", type=click.Choice(["lima", "alpaca"]), default="lima",
              show_default=True,
              help="User turns as they are (LIMA's dialogue format) or in Stanford Alpaca's "
              "prompt; sample the model with the same --template.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=str),
              help="New directory for the dataset (written whole or not at all).")
@click.option("--dev-from-train", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hold out N seeded training dialogues as the dev split.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for --dev-from-train and --sample.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Keep a seeded sample of N training dialogues (LIMA §5 quantity ablation).")
@click.option("--sources", default=None,
              help="Comma-separated sources to train on, e.g. stackexchange,wikihow "
              "(LIMA §5 diversity ablation); -NAME leaves NAME out: --sources=-multi_turn "
              "trains without LIMA §6's 30 multi-turn dialogues.")
def data_prepare(input_dir, fmt, template, output_dir, dev_from_train, seed, sample, sources):
    """Check the input files (GAIR, Alpaca, ShareGPT or OpenAI messages) and write them as a
    versioned ArrayRecord dataset of GAIR rows."""
    from limajax import data as data_lib

    options = data_lib.PrepareOptions(
        dev_from_train=dev_from_train, seed=seed, sample=sample,
        sources=tuple(s.strip() for s in sources.split(",") if s.strip()) if sources else None,
        format=fmt, template=template,
    )
    metadata = data_lib.prepare(input_dir or data_lib.SAMPLE_DATA, output_dir, options)
    click.echo(data_lib.format_prepared(metadata, output_dir))


@data.command("inspect")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              help="A directory written by `limajax data prepare`.")
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(path_type=str),
              help="A model directory, or a bare tokenizer.model or tokenizer.json (with LIMA's "
              "EOT).")
@click.option("--max-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Trim length (LIMA §3: 2048).")
@click.option("--train-on-prompts", is_flag=True,
              help="Count loss on user turns too (default: assistant turns and their EOT).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write a histogram of lengths to this PNG instead of the text one.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Dialogues per step, for the rows and padding of an epoch packed and not.")
def data_inspect(data_dir, tokenizer_path, max_len, train_on_prompts, plot, batch_size):
    """Examples per split and source, turns, token lengths, trimming and loss coverage."""
    from limajax import data as data_lib
    from limajax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(tokenizer_path)
    stats = data_lib.inspect(data_dir, tokenizer, max_len=max_len,
                             train_on_prompts=train_on_prompts, batch_size=batch_size)
    click.echo(data_lib.format_stats(stats, histogram=plot is None))
    if plot:
        data_lib.plot_lengths(stats, plot)
        click.echo(f"wrote {plot}")
