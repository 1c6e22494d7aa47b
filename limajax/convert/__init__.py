"""Meta's consolidated.NN.pth shards and Hugging Face safetensors <-> limajax parameters.

One table (`table.WEIGHTS`) says for every parameter its name in each format, how its axes are
laid out there and along which axis Meta's model-parallel shards split it
(reference/lima-and-llama.md §5.2); `table` also holds the few pure functions that move tensors
by it. `meta` and `hf` read and write the two formats; this module turns them into model
directories (checkpoint.py) and back. tools/bench_convert.py measures the memory.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from limajax.checkpoint import load_model, write_model_dir
from limajax.config import ModelConfig
from limajax.convert.hf import config_from_hf, read_hf, write_hf
from limajax.convert.meta import config_from_meta, context_guess, read_meta, write_meta
from limajax.convert.table import (
    WEIGHTS,
    allocate,
    extract,
    layout_shape,
    place,
    sizes_for,
    weights_for,
)
from limajax.errors import UserError
from limajax.files import staged_dir
from limajax.tokenizer import TokenSpec, save_to

# __all__ repeats the imports: it is the package's public surface, which ruff checks (F401).
__all__ = ["WEIGHTS", "allocate", "config_from_hf", "config_from_meta", "context_guess",
           "convert", "export", "extract", "layout_shape", "place", "read_hf", "read_meta",
           "sizes_for", "weights_for", "write_hf", "write_meta"]


def convert(source: str, input_dir: str | Path, output: str | Path, *,
            tokenizer: str | Path | None = None, dtype: str = "float32", add_eot: bool = True,
            overwrite: bool = False, max_seq_len: int | None = None, no_tokenizer: bool = False
            ) -> tuple[ModelConfig, TokenSpec]:
    """`limajax convert`: a Meta or HF checkpoint -> a model directory, built beside `output`
    and renamed when complete. Needs disk for the model twice while it runs. Returns the
    config and the token ids; what it assumed (no tokenizer, a context from the family's
    rule) it says on stderr."""
    if source not in ("meta", "hf"):
        raise UserError(f"--from {source!r}: expected meta or hf")
    if source == "hf" and tokenizer is not None:
        raise UserError("--tokenizer is for --from meta; an HF checkpoint's tokenizer.model is "
                        "read from its directory")
    with staged_dir(output, command="convert", overwrite=overwrite) as tmp:
        staging = tmp / ".staging"
        staging.mkdir()
        if source == "meta":
            c = read_meta(input_dir, tokenizer=tokenizer, dtype=dtype, add_eot=add_eot,
                          staging=staging, max_seq_len=max_seq_len, no_tokenizer=no_tokenizer)
        else:
            c = read_hf(input_dir, dtype=dtype, add_eot=add_eot, staging=staging,
                        max_seq_len=max_seq_len, no_tokenizer=no_tokenizer)
        write_model_dir(tmp, c.params, c.config, c.tokens, c.tokenizer)
        config, tokens, found = c.config, c.tokens, c.tokenizer
        del c  # drop the memmaps before their files
        shutil.rmtree(staging)
    if found is None:
        print(f"notice: --no-tokenizer: the model directory has no tokenizer; BOS "
              f"{tokens.bos_id} and EOS {tokens.eos_id} are assumed", file=sys.stderr)
    guess = context_guess(input_dir, max_seq_len) if source == "meta" else None
    if guess is not None:
        print(f"notice: context {config.max_seq_len:,} is the {guess[0]} family's (Meta's "
              "params.json does not state it); pass --max-seq-len N if the model was trained "
              "at another length", file=sys.stderr)
    return config, tokens


def format_summary(output: str, config: ModelConfig, tokens: TokenSpec, dtype: str) -> str:
    eot = f", EOT {tokens.eot_id}" if tokens.eot_id is not None else ", no EOT"
    return (f"wrote {output}: {config.n_params / 1e6:,.1f}M parameters ({dtype}), "
            f"{config.n_layers} layers, vocabulary {tokens.vocab_size}{eot} "
            f"(padded to {tokens.padded_vocab_size}), context {config.max_seq_len:,}")


def export(target: str, model_dir: str | Path, output: str | Path, *, shards: int = 1,
           overwrite: bool = False, epoch: int | None = None) -> None:
    """`limajax export`: a model directory (or a training workdir's epoch) -> a Hugging Face or
    Meta checkpoint directory, built beside `output` and renamed when complete."""
    if target not in ("hf", "meta"):
        raise UserError(f"--to {target!r}: expected hf or meta")
    if shards < 1 or (target == "hf" and shards != 1):
        raise UserError("--shards is for --to meta and must be >= 1")
    params, config, tokens, tokenizer = load_model(model_dir, epoch=epoch)
    with staged_dir(output, overwrite=overwrite, command=f"export --to {target}") as tmp:
        if target == "hf":
            write_hf(tmp, params, config, tokens, tokenizer)
        else:
            write_meta(tmp, params, config, shards)
            save_to(tmp, tokenizer, None)
