"""What a prepared dataset holds (`limajax data inspect`): examples per split and source, turns,
token lengths, trimming and loss coverage, as text or a histogram PNG."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from limajax.config import BUCKETS, MAX_LEN, buckets_for
from limajax.data.batches import Batches
from limajax.data.dataset import conversations, load, split_names
from limajax.errors import UserError
from limajax.files import staged_path
from limajax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SplitStats:
    """One split, tokenized as training sees it."""

    split: str
    sources: dict[str, int]
    turns: dict[int, int]  # dialogues per number of turns
    lengths: np.ndarray  # tokens per dialogue before trimming, BOS and EOTs included
    max_len: int
    loss_tokens: int  # tokens with loss_mask 1, after trimming
    no_loss: int  # dialogues left with no loss token after trimming
    # Epoch 1's batches of `batch_size` dialogues: {"packed"/"padded": (rows, tokens computed)}
    batch_size: int = 0
    batching: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def examples(self) -> int:
        return len(self.lengths)

    @property
    def trimmed(self) -> int:
        return int((self.lengths > self.max_len).sum())

    @property
    def tokens(self) -> int:
        """Tokens after trimming."""
        return int(np.minimum(self.lengths, self.max_len).sum())

    def percentiles(self) -> dict[str, int]:
        ps = np.percentile(self.lengths, [50, 90, 99]).round().astype(int).tolist()
        return {"p50": ps[0], "p90": ps[1], "p99": ps[2], "max": int(self.lengths.max())}


def inspect(
    data_dir: str | Path, tokenizer: Tokenizer, max_len: int = MAX_LEN,
    train_on_prompts: bool = False, batch_size: int = 32,
) -> list[SplitStats]:
    """Count every split of a prepared dataset with `tokenizer`, and what training computes for
    the dialogues' first epoch at `batch_size`, packed and one per row."""
    stats = []
    for split in split_names(data_dir):
        source = load(data_dir, split)
        records = [source[i] for i in range(len(source))]
        lengths, loss_tokens, no_loss = [], 0, 0
        for record in records:
            full = tokenizer.encode_dialogue(conversations(record), max_len=2**62,
                                             train_on_prompts=train_on_prompts)
            lengths.append(len(full.ids))
            kept = int(full.loss_mask[:max_len].sum())
            loss_tokens, no_loss = loss_tokens + kept, no_loss + (kept == 0)
        decoded = [r["source"].decode("utf-8") for r in records]
        batching = {}
        if split == "train" and tokenizer.eot_id is not None:
            trimmed = [min(n, max_len) for n in lengths]
            for name, pack in (("packed", True), ("padded", False)):
                batches = Batches(records, tokenizer, batch_size=batch_size, max_len=max_len,
                                  buckets=buckets_for(max_len), pack=pack, process_index=0,
                                  process_count=1)
                shapes = batches.shapes(0, trimmed)
                batching[name] = (sum(r for r, _ in shapes), sum(r * t for r, t in shapes))
        stats.append(SplitStats(
            split=split,
            sources=dict(Counter(decoded).most_common()),
            turns=dict(sorted(Counter(len(r["conversations"]) for r in records).items())),
            lengths=np.asarray(lengths, np.int64),
            max_len=max_len,
            loss_tokens=loss_tokens,
            no_loss=no_loss,
            batch_size=batch_size,
            batching=batching,
        ))
    return stats


def _length_bins(lengths: np.ndarray) -> list[int]:
    """0, the length buckets, then doublings: up to the first edge that holds the longest."""
    edges = [0]
    while edges[-1] < lengths.max():
        bigger = [b for b in BUCKETS if b > edges[-1]]
        edges.append(bigger[0] if bigger else edges[-1] * 2)
    return edges


def format_stats(stats: list[SplitStats], histogram: bool = True) -> str:
    """A plain-text report of `inspect`'s counts."""
    lines = []
    for s in stats:
        p = s.percentiles()
        lines += [
            f"{s.split}: {s.examples:,} dialogues",
            "  sources: " + ", ".join(f"{k} {v:,}" for k, v in s.sources.items()),
            "  turns:   " + ", ".join(f"{k} x{v:,}" for k, v in s.turns.items()),
            f"  tokens per dialogue (BOS and EOTs included): p50 {p['p50']:,}  p90 {p['p90']:,}"
            f"  p99 {p['p99']:,}  max {p['max']:,}",
            f"  trimmed at {s.max_len}: {s.trimmed:,} ({s.trimmed / s.examples:.1%})",
        ]
        if max(s.turns) == 1:  # GAIR's test prompts: nothing to learn from, nothing to report
            lines.append(f"  tokens after trimming: {s.tokens:,}; prompts only, no loss")
        else:
            lines.append(f"  tokens after trimming: {s.tokens:,}; carrying loss: "
                         f"{s.loss_tokens:,} ({s.loss_tokens / s.tokens:.1%})")
        if s.no_loss and max(s.turns) > 1:
            lines.append(f"  dialogues with no token carrying loss: {s.no_loss:,}")
        if s.batching:
            # Tokens a step computes: rows x bucket length; the rest of each row is padding.
            lines.append(f"  an epoch in batches of {s.batch_size} (max length {s.max_len}):")
            real = s.tokens - s.examples  # each dialogue's inputs: its tokens but the last
            for name, (rows, tokens) in s.batching.items():
                lines.append(f"    {name + ':':<8} {rows:>6,} rows, {tokens:>11,} tokens computed,"
                             f" {1 - real / tokens:.1%} padding")
        if histogram:
            edges = _length_bins(s.lengths)
            # Bin i holds lengths in (edges[i-1], edges[i]]: the dialogues that fit bucket i.
            counts = np.bincount(np.searchsorted(edges, s.lengths), minlength=len(edges))[1:]
            lines.append("  length histogram (tokens: dialogues):")
            for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True):
                bar = "#" * round(40 * n / max(counts.max(), 1))
                lines.append(f"    {lo + 1:>5}-{hi:<5} {n:>6,} {bar}")
    return "\n".join(lines)


def plot_lengths(stats: list[SplitStats], path: str | Path) -> None:
    """A histogram of dialogue lengths per split, with the trimming length marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(stats), 1, figsize=(8, 2.8 * len(stats)), squeeze=False)
    for ax, s in zip(axes[:, 0], stats, strict=True):
        ax.hist(s.lengths, bins=50, color="tab:blue")
        ax.axvline(s.max_len, color="tab:red", linestyle="--", label=f"trimmed at {s.max_len}")
        ax.set_title(f"{s.split}: {s.examples:,} dialogues, {s.trimmed:,} trimmed")
        ax.set_xlabel("tokens per dialogue")
        ax.set_ylabel("dialogues")
        ax.legend()
    fig.tight_layout()
    try:
        with staged_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:] or "png")
    except OSError as e:
        raise UserError(f"{path}: cannot write the plot ({e.strerror})") from None
    finally:
        plt.close(fig)
