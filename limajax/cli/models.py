"""`limajax convert` / `export`: Meta and Hugging Face checkpoints <-> model directories."""

import click

from limajax import cli


@cli.main.command()
@click.option("--from", "source", required=True, type=click.Choice(["meta", "hf"]),
              help="meta: params.json + consolidated.NN.pth; hf: config.json + safetensors.")
@click.option("--input", "input_dir", required=True, type=click.Path(path_type=str),
              help="The checkpoint directory.")
@click.option("--tokenizer", type=click.Path(path_type=str), default=None,
              help="(meta) tokenizer.model or tokenizer.json; default: the one in --input or "
              "beside it.")
@click.option("--output", required=True, type=click.Path(path_type=str),
              help="New model directory (built beside it, renamed when complete).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Parameter dtype in the model directory.")
@click.option("--add-eot/--no-add-eot", default=True, show_default=True,
              help="Add LIMA's end-of-turn token (id = the base vocabulary size; its rows start "
              "as the mean of the others).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Context length (default: config.json's; for Meta, the family's: LLaMA-1 "
              "2048, Llama-2 4096, Llama-3 8192, Llama-3.1 131072).")
@click.option("--no-tokenizer", is_flag=True,
              help="Convert without a tokenizer.model (score and train --init refuse such a "
              "model; export works).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --output that an earlier convert made (nothing else).")
def convert(source, input_dir, tokenizer, output, dtype, add_eot, max_seq_len, no_tokenizer,
            overwrite):
    """LLaMA weights -> a limajax model directory (params/, model.json, tokens.json, tokenizer).

    Tensors are streamed one at a time, so memory stays near one merged tensor; disk needs
    about twice the converted model while it runs.

    Example: limajax convert --from meta --input llama/7B --output models/llama1-7b
    """
    from limajax import convert as convert_lib

    config, tokens = convert_lib.convert(source, input_dir, output, tokenizer=tokenizer,
                                         dtype=dtype, add_eot=add_eot, overwrite=overwrite,
                                         max_seq_len=max_seq_len, no_tokenizer=no_tokenizer)
    click.echo(convert_lib.format_summary(output, config, tokens, dtype))


@cli.main.command()
@click.option("--to", "target", required=True, type=click.Choice(["hf", "meta"]),
              help="hf: safetensors + config.json + tokenizer for transformers; meta: params.json "
              "+ consolidated.NN.pth.")
@cli.model_source_options
@click.option("--output", required=True, type=click.Path(path_type=str),
              help="New checkpoint directory (built beside it, renamed when complete).")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(min=1),
              help="(meta) model-parallel shards to split the tensors into.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --output that an earlier export --to the same format made "
              "(nothing else).")
def export(target, model_dir, workdir, epoch, output, shards, overwrite):
    """A model directory, or a training epoch, -> a Hugging Face or Meta checkpoint
    (vocabulary padding dropped).

    Examples: limajax export --to hf --model models/llama1-7b --output hf/llama1-7b;
    limajax export --to hf --workdir runs/lima-65b --epoch 7 --output hf/lima-65b-e7
    """
    from limajax import convert as convert_lib

    source, epoch = cli.model_source(model_dir, workdir, epoch)
    convert_lib.export(target, source, output, shards=shards, overwrite=overwrite, epoch=epoch)
    click.echo(f"wrote {output}")
