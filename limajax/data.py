"""LIMA's dialogues: GAIR's JSONL -> a versioned TFDS dataset (ArrayRecord) -> grain -> batches.

    prepare(GAIR_DIR, DATA_DIR)          validate, select subsets, write DATA_DIR/lima/1.0.0/
    Batches(load(DATA_DIR), tokenizer)   padded global batches, epoch after epoch, resumable

A batch is a dict of numpy arrays for this process's rows of one global batch (DESIGN §4):
    inputs    int32   [B, T]  ids[:-1], right-padded with 0
    targets   int32   [B, T]  ids[1:]
    loss_mask float32 [B, T]  mask[1:]: assistant tokens and their EOT (LIMA §3); 0 on padding
    positions int32   [B, T]  0..T-1 on every row: padding continues the count, and is harmless
                              because it sits right of the real tokens under a causal mask
T is the smallest length bucket that holds the longest row of the *global* batch, so every
process agrees on it. Rows are never packed together, so examples never attend to each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from limajax import __version__
from limajax.errors import UserError
from limajax.tokenizer import MAX_LEN, Encoded, Tokenizer

SPLITS = ("train", "dev", "test")
BUCKETS = (256, 512, 1024, 2048)
SAMPLE_DATA = Path(__file__).parent / "sample_data"  # the embedded dialogues, GAIR's schema
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


# --- GAIR's files -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One dialogue: user and assistant turns alternating, user first."""

    id: str  # "<file's split>-<line number>", so a row can be found in the input again
    conversations: tuple[str, ...]
    source: str


def read_gair_file(path: Path, split: str) -> tuple[list[Row], dict]:
    """Read and check one GAIR JSONL file; a bad line is a UserError naming file and line."""
    data = path.read_bytes()
    rows, dropped_turns, skipped = [], 0, 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
            obj = json.loads(line) if line.strip() else None
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if obj is None:
            continue  # blank line
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "conversations" not in obj:
            raise UserError(f'{where}: no "conversations" field')
        turns, source = obj["conversations"], obj.get("source", "unknown")
        if not isinstance(turns, list):
            raise UserError(f'{where}: "conversations" must be a list of strings')
        if not turns:
            raise UserError(f'{where}: empty dialogue ("conversations" is [])')
        for k, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise UserError(f"{where}: turn {k} is {type(turn).__name__}, expected a string")
        if not isinstance(source, str):
            raise UserError(f'{where}: "source" must be a string')
        if split == "train" and len(turns) % 2 == 1:
            # Some of GAIR's training rows end with a user turn that has no answer: nothing to
            # learn from it, so it goes (as open-instruct does), counted rather than fatal.
            turns, dropped_turns = turns[:-1], dropped_turns + 1
            if not turns:
                skipped += 1
                continue
        rows.append(Row(f"{split}-{lineno:05d}", tuple(turns), source))
    report = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    if split == "train":
        report |= {"trailing_user_turns_dropped": dropped_turns, "rows_without_answer": skipped}
    return rows, report


def read_gair_dir(input_dir: str | Path) -> tuple[dict[str, list[Row]], dict]:
    """GAIR's train.jsonl and, when present, test.jsonl and dev.jsonl, checked."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: no such directory (expected GAIR's train.jsonl in it)")
    if not (input_dir / "train.jsonl").is_file():
        raise UserError(f"{input_dir}: no train.jsonl (GAIR's files: train.jsonl, test.jsonl)")
    splits, inputs = {}, {}
    for split in SPLITS:
        path = input_dir / f"{split}.jsonl"
        if path.is_file():
            splits[split], inputs[path.name] = read_gair_file(path, split)
    if not splits["train"]:
        raise UserError(f"{input_dir / 'train.jsonl'}: no dialogues")
    return splits, {"inputs": inputs}


# --- subsets for LIMA §5's ablations --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Which rows go where. The dev rows are drawn first, so subsets share one dev set."""

    dev_from_train: int = 0  # hold out this many seeded training rows as the dev split
    seed: int = 0
    sample: int | None = None  # keep a seeded sample of this many training rows (§5 quantity)
    sources: tuple[str, ...] | None = None  # keep only these training sources (§5 diversity)


def select(splits: dict[str, list[Row]], options: PrepareOptions) -> tuple[dict, dict]:
    """Apply dev hold-out, source filter and sample to the training rows; report what was done."""
    splits, train = dict(splits), splits["train"]
    if options.dev_from_train:
        if "dev" in splits:
            raise UserError("the input has dev.jsonl and --dev-from-train was given: choose one")
        if not 0 < options.dev_from_train < len(train):
            raise UserError(
                f"--dev-from-train {options.dev_from_train}: must be between 1 and "
                f"{len(train) - 1} (there are {len(train)} training dialogues)"
            )
        order = np.random.default_rng(options.seed).permutation(len(train))
        held = set(order[: options.dev_from_train].tolist())
        splits["dev"] = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if options.sources is not None:
        counts = Counter(r.source for r in train)
        missing = sorted(set(options.sources) - set(counts))
        if missing:
            present = ", ".join(f"{s} ({n})" for s, n in sorted(counts.items()))
            raise UserError(
                f"--sources: no training rows from {', '.join(missing)}; present: {present}"
            )
        train = [r for r in train if r.source in options.sources]
    if options.sample is not None:
        if not 0 < options.sample <= len(train):
            raise UserError(f"--sample {options.sample}: must be between 1 and {len(train)}")
        rng = np.random.default_rng([options.seed, 1])
        keep = rng.choice(len(train), options.sample, replace=False)
        train = [train[i] for i in sorted(keep.tolist())]
    splits["train"] = train
    report = {
        "options": dataclasses.asdict(options),
        "examples": {split: len(rows) for split, rows in splits.items()},
    }
    return splits, report


# --- the TFDS builder -----------------------------------------------------------------------------


class Lima(tfds.core.GeneratorBasedBuilder):
    """LIMA's dialogues from GAIR's JSONL files (a manual download), stored as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "id, conversations, source; unanswered last training turns dropped."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "LIMA is gated on the Hugging Face hub: accept the terms at "
        "https://huggingface.co/datasets/GAIR/lima, download train.jsonl and test.jsonl into a "
        "directory and pass it as the manual directory (`limajax data prepare --input DIR`)."
    )

    def __init__(self, *, options: PrepareOptions = PrepareOptions(), **kwargs):
        self.options = options
        # ArrayRecord, because the default tfrecord format needs TensorFlow to write.
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo built by hand: dataset_info_from_configs wants a package directory.
        return tfds.core.DatasetInfo(
            builder=self,
            description="LIMA (Zhou et al. 2023): 1,000 curated prompts and responses, plus "
            "30 multi-turn dialogues, in GAIR's schema.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "conversations": tfds.features.Sequence(tfds.features.Text()),
                "source": tfds.features.Text(),
            }),
            disable_shuffling=True,  # keep the files' order: example i is the i-th row
            homepage="https://huggingface.co/datasets/GAIR/lima",
            license="CC BY-NC-SA, or the source data's stricter license (GAIR/lima card)",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        splits, report = read_gair_dir(dl_manager.manual_dir)
        splits, selected = select(splits, self.options)
        self.info.metadata.update(report | selected | {"limajax_version": __version__})
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
        for r in rows:
            yield r.id, {"id": r.id, "conversations": list(r.conversations), "source": r.source}


def prepare(input_dir: str | Path, output_dir: str | Path, options=PrepareOptions()) -> dict:
    """Build the dataset into `output_dir` atomically (all or nothing); returns its metadata."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{output_dir}: already exists and is not empty; choose a new --output")
    select(read_gair_dir(input_dir)[0], options)  # every input error before any output
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        tfds.disable_progress_bar()
        builder = Lima(data_dir=tmp, options=options)
        with contextlib.redirect_stdout(io.StringIO()):  # tfds prints its own progress lines
            builder.download_and_prepare(
                download_dir=tmp / "downloads",
                download_config=tfds.download.DownloadConfig(manual_dir=str(input_dir)),
            )
        shutil.rmtree(tmp / "downloads", ignore_errors=True)
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(builder.info.metadata)


def dataset_dir(data_dir: str | Path) -> Path:
    """The prepared dataset's version directory inside `data_dir` (or `data_dir` itself)."""
    data_dir = Path(data_dir)
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    found = sorted(
        (p.parent for p in data_dir.glob("lima/*/dataset_info.json")
         if tfds.core.Version.is_valid(p.parent.name)),
        key=lambda p: tfds.core.Version(p.name),
    )
    if not found:
        raise UserError(f"{data_dir}: no prepared LIMA dataset (run `limajax data prepare`)")
    return found[-1]


def read_metadata(data_dir: str | Path) -> dict:
    """What `prepare` recorded: input checksums, options, examples per split."""
    path = dataset_dir(data_dir) / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def split_names(data_dir: str | Path) -> list[str]:
    info = tfds.builder_from_directory(dataset_dir(data_dir)).info
    return [s for s in SPLITS if s in info.splits]


def load(data_dir: str | Path, split: str = "train"):
    """A random-access source of one split's records (dicts of bytes), in the input files' order."""
    builder = tfds.builder_from_directory(dataset_dir(data_dir))
    if split not in builder.info.splits:
        have = ", ".join(builder.info.splits)
        raise UserError(f"{data_dir}: no {split!r} split (it has: {have})")
    return builder.as_data_source(split=split)


def conversations(record) -> list[str]:
    """A record's turns as text (TFDS gives Text features back as bytes)."""
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in record["conversations"]]


# --- batches ------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Global batches in one pass over the data; a short last batch counts unless dropped."""
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


def bucket_length(length: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds `length` tokens: a handful of shapes to compile."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"{length} tokens do not fit the largest bucket {max(buckets)}")


class Batches:
    """Global batches of one split, epoch after epoch, with a resumable position.

    Epoch e visits every example once, in an order seeded by (seed, e). The last, short batch is
    filled with all-padding rows (loss_mask 0), so shapes stay static; normalising the loss by
    the real target-token count (the sum of loss_mask over the global batch) makes it exact.
    With N processes, process i gets rows [i*B/N, (i+1)*B/N) of every global batch.
    Iterating advances the position; get_state() is the position of the next batch.
    """

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seed: int = 0,
        num_epochs: int | None = None,
        buckets: Sequence[int] = BUCKETS,
        max_len: int = MAX_LEN,
        train_on_prompts: bool = False,
        drop_remainder: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
    ):
        if process_index is None or process_count is None:
            import jax  # only to learn which process this is

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size <= 0 or batch_size % process_count:
            raise UserError(
                f"batch size {batch_size} does not split over {process_count} processes"
            )
        if max(buckets) < max_len - 1:
            raise UserError(f"the largest length bucket {max(buckets)} is below {max_len - 1}")
        if tokenizer.eot_id is None:
            raise UserError(f"{tokenizer.path}: the model has no EOT token to end turns with")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seed, self.num_epochs = batch_size, seed, num_epochs
        self.buckets, self.max_len = tuple(buckets), max_len
        self.train_on_prompts = train_on_prompts
        self.drop_remainder, self.read_options = drop_remainder, read_options
        self.rows = slice(
            process_index * batch_size // process_count,
            (process_index + 1) * batch_size // process_count,
        )
        self.steps_per_epoch = steps_per_epoch(len(source), batch_size, drop_remainder)
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(source)} examples make no full batch of {batch_size}")
        self._epoch, self._index = 0, 0

    def _epoch_seed(self, epoch: int) -> int:
        # Mix (seed, epoch) rather than add them: seed s, epoch 1 must not equal seed s+1, epoch 0.
        return int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])

    def order(self, epoch: int) -> list[int]:
        """The example indices of `epoch`, in the order they are batched."""
        ds = grain.MapDataset.range(len(self.source)).shuffle(seed=self._epoch_seed(epoch))
        return [ds[i] for i in range(len(ds))]

    def encode(self, record) -> Encoded:
        return self.tokenizer.encode_dialogue(
            conversations(record), max_len=self.max_len, train_on_prompts=self.train_on_prompts
        )

    def collate(self, rows: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Pad a global batch to B rows and one bucket; keep this process's rows."""
        t = bucket_length(max(len(r.ids) - 1 for r in rows), self.buckets)
        mine = list(rows)[self.rows]
        b = self.rows.stop - self.rows.start
        batch = {
            "inputs": np.zeros((b, t), np.int32),
            "targets": np.zeros((b, t), np.int32),
            "loss_mask": np.zeros((b, t), np.float32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        }
        for i, r in enumerate(mine):  # rows past len(mine) stay all padding
            n = len(r.ids) - 1
            batch["inputs"][i, :n] = r.ids[:-1]
            batch["targets"][i, :n] = r.ids[1:]
            batch["loss_mask"][i, :n] = r.loss_mask[1:]
        return batch

    def epoch_batches(self, epoch: int) -> grain.MapDataset:
        """This process's batches of `epoch`, as a random-access grain dataset."""
        ds = grain.MapDataset.source(self.source).shuffle(seed=self._epoch_seed(epoch))
        ds = ds.map(self.encode)
        return ds.batch(self.batch_size, drop_remainder=self.drop_remainder, batch_fn=self.collate)

    def __iter__(self):
        while self.num_epochs is None or self._epoch < self.num_epochs:
            epoch, start = self._epoch, self._index
            batches = self.epoch_batches(epoch)[start:].to_iter_dataset(self.read_options)
            for index, batch in enumerate(batches, start + 1):
                last = index == self.steps_per_epoch
                self._epoch, self._index = (epoch + 1, 0) if last else (epoch, index)
                yield batch

    def get_state(self) -> dict:
        """The position of the next batch: {"epoch": e, "index": i} (JSON-able, for checkpoints)."""
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise UserError(
                f"data position {state} does not fit {self.steps_per_epoch} batches per epoch"
            )
        last = index == self.steps_per_epoch
        self._epoch, self._index = (epoch + 1, 0) if last else (epoch, index)


# --- what a prepared dataset holds (`limajax data inspect`) ---------------------------------------


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
    train_on_prompts: bool = False,
) -> list[SplitStats]:
    """Count every split of a prepared dataset with `tokenizer`."""
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
        stats.append(SplitStats(
            split=split,
            sources=dict(Counter(decoded).most_common()),
            turns=dict(sorted(Counter(len(r["conversations"]) for r in records).items())),
            lengths=np.asarray(lengths, np.int64),
            max_len=max_len,
            loss_tokens=loss_tokens,
            no_loss=no_loss,
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
        fig.savefig(path)
    except OSError as e:
        raise UserError(f"{path}: cannot write the plot ({e.strerror})") from None
    finally:
        plt.close(fig)
