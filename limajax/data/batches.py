"""Global batches for the train step: dialogues -> ids + loss mask -> packed, bucketed arrays,
epoch after epoch, with a resumable position.

A batch is a dict of numpy arrays for this process's rows of one global batch (DESIGN §4):
    inputs      int32   [R, T]  ids[:-1] of each dialogue laid into a row, 0 on padding
    targets     int32   [R, T]  ids[1:]
    loss_mask   float32 [R, T]  mask[1:]: assistant tokens and their EOT (LIMA §3); 0 on padding
    positions   int32   [R, T]  0, 1, ... restarting at each dialogue (rotary positions)
    segment_ids int32   [R, T]  1, 2, ... one per dialogue in its row; 0 on padding
A step is LIMA's: `batch_size` dialogues, in the seeded order. Packed (the default), those
dialogues are laid first-fit-decreasing into as few rows of T tokens as hold them, and the
attention mask (segment and causality) keeps every dialogue to itself, so the step computes the
same loss and gradient as one dialogue per row at about a third of the tokens on LIMA's data.
Unpacked (`data.pack: false`), each dialogue has a row of its own, R = batch_size.
T is the smallest length bucket that holds the longest dialogue of the *global* batch, and R one
of a few row counts (ROW_STEPS) times the rows' multiple (the data axis and the processes), so
every process agrees on the shape and only a handful of shapes compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import jax
import numpy as np

from limajax.config import BUCKETS, MAX_LEN, TrainConfig, bucket_length, buckets_for
from limajax.data.dataset import conversations, load, split_names
from limajax.data.gair import SAMPLE_DATA, read_gair_file
from limajax.errors import UserError
from limajax.tokenizer import Encoded, Tokenizer

# Packed row counts are one of these times the rows' multiple (at most 25% above the rows the
# dialogues need, and four shapes per doubling): on LIMA at batch 32 and 2048 tokens a packed
# epoch computes 38% of the padded tokens, against 34% with no rounding at all.
ROW_STEPS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96,
             112, 128)
BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Global batches in one pass over the data; a short last batch counts unless dropped."""
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


def pack(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` laid into as few rows of `row_len` as
    the greedy finds, each row in the dialogues' original order (a stable sort keeps ties)."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return [sorted(r) for r in rows]


def row_count(needed: int, multiple: int, most: int) -> int:
    """Rows for a global batch: `needed` rounded up to a ROW_STEPS multiple of `multiple`,
    never above `most` (the unpacked row count)."""
    for step in ROW_STEPS:
        if step * multiple >= needed:
            return min(step * multiple, most)
    return most


class Batches:
    """Global batches of one split, epoch after epoch, with a resumable position.

    Epoch e visits every example once, in an order seeded by (seed, e). The last, short batch
    has fewer dialogues (and, unpacked, all-padding rows with loss_mask 0); normalising the loss
    by the real target-token count (the sum of loss_mask over the global batch) makes it exact.
    With N processes, process i gets rows [i*R/N, (i+1)*R/N) of every global batch's R rows.
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
        pack: bool = True,
        row_multiple: int = 1,
        process_index: int | None = None,
        process_count: int | None = None,
        read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
    ):
        if process_index is None or process_count is None:
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
        self.train_on_prompts, self.pack = train_on_prompts, pack
        # Packed rows split evenly over the processes and the data axis (and micro batches).
        self.row_multiple = math.lcm(row_multiple, process_count)
        if batch_size % self.row_multiple:
            raise UserError(f"batch size {batch_size} is not a multiple of the rows' multiple "
                            f"{self.row_multiple} (data axis x micro batches, and processes)")
        self.process_index, self.process_count = process_index, process_count
        self.drop_remainder, self.read_options = drop_remainder, read_options
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

    def trimmed(self) -> int:
        """How many dialogues are longer than max_len, so that training sees only their
        beginning (LIMA §3); encodes every dialogue once."""
        return sum(self.encode(self.source[i]).trimmed for i in range(len(self.source)))

    def layout(self, lengths: Sequence[int]) -> tuple[int, list[list[int]]]:
        """(T, rows): the bucket length and which dialogues (by index in the global batch) each
        row of the global batch holds; rows past the dialogues are all padding."""
        t = bucket_length(max(lengths), self.buckets)
        if self.pack:
            rows = pack(lengths, t)
            n = row_count(len(rows), self.row_multiple, self.batch_size)
        else:
            rows, n = [[i] for i in range(len(lengths))], self.batch_size
        return t, rows + [[] for _ in range(n - len(rows))]

    def shapes(self, epoch: int = 0, lengths: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(global rows, T) of each batch of `epoch`, without building them; `lengths` (tokens
        per example, trimmed, by source index) saves encoding every dialogue again."""
        if lengths is None:
            lengths = [len(self.encode(self.source[i]).ids) for i in range(len(self.source))]
        ordered = [lengths[i] - 1 for i in self.order(epoch)]
        b = self.batch_size
        return [(len(rows), t) for t, rows in
                (self.layout(ordered[s * b:(s + 1) * b]) for s in range(self.steps_per_epoch))]

    def collate(self, dialogues: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Lay a global batch into rows of one bucket; keep this process's rows."""
        t, rows = self.layout([len(d.ids) - 1 for d in dialogues])
        per_process = len(rows) // self.process_count
        mine = rows[self.process_index * per_process:(self.process_index + 1) * per_process]
        batch = {k: np.zeros((len(mine), t), np.float32 if k == "loss_mask" else np.int32)
                 for k in BATCH_KEYS}
        for r, row in enumerate(mine):
            at = 0
            for segment, i in enumerate(row, 1):
                d = dialogues[i]
                n = len(d.ids) - 1
                span = slice(at, at + n)
                batch["inputs"][r, span] = d.ids[:-1]
                batch["targets"][r, span] = d.ids[1:]
                batch["loss_mask"][r, span] = d.loss_mask[1:]
                batch["positions"][r, span] = np.arange(n)
                batch["segment_ids"][r, span] = segment
                at += n
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
                self.set_state({"epoch": epoch, "index": index})
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


def training_source(config: TrainConfig):
    """The training dialogues: a prepared dataset (--data) or the embedded sample data."""
    if config.data.path is not None:
        return load(config.data.path, "train")
    rows, _ = read_gair_file(SAMPLE_DATA / "train.jsonl", "train")
    return [{"conversations": list(r.conversations)} for r in rows]


def batches_for(config: TrainConfig, tokenizer: Tokenizer, data_axis: int,
                split: str = "train") -> Batches | None:
    """The Batches a training run's recipe asks for, on a mesh whose data axis has `data_axis`
    devices (rows come in multiples of it times the accumulation steps): the training split,
    epoch after epoch, or one pass over the dataset's `split` (dev: LIMA App. B compares dev
    perplexity with quality across epochs), None if it has none."""
    d = config.data
    if split == "train":
        source, epochs = training_source(config), config.epochs
    elif d.path is None or split not in split_names(d.path):
        return None
    else:
        source, epochs = load(d.path, split), 1
    return Batches(source, tokenizer, batch_size=d.batch_size, seed=d.seed, num_epochs=epochs,
                   max_len=d.max_len, buckets=buckets_for(d.max_len),
                   train_on_prompts=d.train_on_prompt, pack=d.pack,
                   row_multiple=data_axis * d.accumulation_steps)
