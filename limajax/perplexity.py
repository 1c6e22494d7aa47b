"""Per-token log-probabilities and perplexity of plain texts under a model.

LIMA App. B compares perplexity on held-out data with generation quality; this is also the
probe a user runs to check a conversion (a converted LLaMA should give low perplexity on text
it has seen the like of, and the same numbers as the reference implementation).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.config import bucket_length, buckets_for
from limajax.errors import UserError
from limajax.files import check_replaceable, json_line, read_jsonl, staged_file
from limajax.model import Llama, token_nll
from limajax.progress import progress
from limajax.tokenizer import Tokenizer


def read_texts(path: str | Path) -> list[dict]:
    """Rows {"id", "text"} of a JSONL file; a bad line is reported by file and line number."""
    rows = []
    for where, n, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{where}: expected an object with a string "text"')
        rows.append({"id": row.get("id", n), "text": row["text"]})
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


@nnx.jit
def token_logprobs(model: Llama, tokens: jax.Array) -> jax.Array:
    """log p(tokens[t] | tokens[:t]) for t >= 1: [B, T-1] (the training loss's numerics)."""
    return -token_nll(model(tokens)[:, :-1], tokens[:, 1:])


def score(model: Llama, tokenizer: Tokenizer, rows: list[dict], mesh: Mesh,
          batch_size: int = 8) -> Iterator[dict]:
    """Rows with token_ids (BOS first, cut to the model's context), logprobs of every token
    after the first, nll, ppl, and whether the text was trimmed."""
    batch_size = sharding.whole_rows(batch_size, mesh)  # rows split evenly over the data axis
    limit = model.config.max_seq_len
    full = [[tokenizer.bos_id] + tokenizer.encode(r["text"]) for r in rows]
    encoded = [ids[:limit] for ids in full]  # LIMA §3 keeps a long text's beginning
    starts = range(0, len(rows), batch_size)
    for start in progress(starts, desc="score", unit="batch"):
        chunk = encoded[start:start + batch_size]
        width = bucket_length(max(len(ids) for ids in chunk), buckets_for(limit))
        tokens = np.zeros((batch_size, width), np.int32)  # right padding is never attended to
        for i, ids in enumerate(chunk):
            tokens[i, :len(ids)] = ids
        with sharding.activate(mesh):
            logp = token_logprobs(model, jax.device_put(tokens, sharding.batch_sharding(mesh)))
        logp = np.asarray(logp, np.float64)
        for i, ids in enumerate(chunk):
            lp = logp[i, :len(ids) - 1]
            nll = float(-lp.mean()) if len(lp) else float("nan")
            yield {**rows[start + i], "token_ids": ids, "logprobs": lp.tolist(), "nll": nll,
                   "ppl": math.exp(nll) if len(lp) else float("nan"),
                   "trimmed": len(full[start + i]) > limit}


def score_file(model_dir: str, input_path: str, output_path: str, mesh_spec: str = "1x1",
               batch_size: int = 8, epoch: int | None = None, overwrite: bool = False) -> dict:
    """`limajax score`: read texts, write scored rows atomically, return a summary (with how
    many texts were trimmed to the model's context). The output is checked before any work."""
    check_replaceable(output_path, overwrite=overwrite)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    rows = read_texts(input_path)
    mesh = sharding.inference_mesh(mesh_spec)
    model, tokenizer = load_for_inference(model_dir, mesh, epoch=epoch)
    total_nll, total_tokens, trimmed = 0.0, 0, 0
    with staged_file(output_path) as f:
        for row in score(model, tokenizer, rows, mesh, batch_size):
            trimmed += row["trimmed"]
            f.write(json_line(row))
            total_nll += -sum(row["logprobs"])
            total_tokens += len(row["logprobs"])
    nll, limit = total_nll / max(total_tokens, 1), model.config.max_seq_len
    if trimmed:
        print(f"notice: {trimmed} of {len(rows)} texts are longer than the model's context "
              f"({limit:,} tokens): scored on their first {limit:,} tokens", file=sys.stderr)
    return {"rows": len(rows), "tokens": total_tokens, "nll": nll, "ppl": math.exp(nll)}


def format_summary(s: dict, output: str) -> str:
    return (f"scored {s['rows']} texts, {s['tokens']} tokens: nll {s['nll']:.4f}, perplexity "
            f"{s['ppl']:.3f} -> {output}")
