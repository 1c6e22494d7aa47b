"""Global batches for the train step: dialogues -> ids + loss mask -> padded, bucketed arrays,
epoch after epoch, with a resumable position.

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

import math
from collections.abc import Sequence

import grain
import jax
import numpy as np

from limajax.config import TrainConfig
from limajax.data.dataset import conversations, load, split_names
from limajax.data.gair import SAMPLE_DATA, read_gair_file
from limajax.errors import UserError
from limajax.tokenizer import MAX_LEN, Encoded, Tokenizer

BUCKETS = (256, 512, 1024, 2048)
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def buckets_for(max_len: int) -> tuple[int, ...]:
    """The lengths sequences of at most `max_len` tokens are padded to: 256, doubling below
    max_len, then max_len itself. One rule for training, scoring and sampling: a handful of
    shapes compile, and a short text is never padded past twice its bucket."""
    out = [BUCKETS[0]]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return (*[b for b in out if b < max_len], max_len)


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


def training_source(config: TrainConfig):
    """The training dialogues: a prepared dataset (--data) or the embedded sample data."""
    if config.data.path is not None:
        return load(config.data.path, "train")
    rows, _ = read_gair_file(SAMPLE_DATA / "train.jsonl", "train")
    return [{"conversations": list(r.conversations)} for r in rows]


def batches_for(config: TrainConfig, tokenizer: Tokenizer) -> Batches:
    """The Batches a training run's recipe asks for."""
    d = config.data
    return Batches(training_source(config), tokenizer, batch_size=d.batch_size, seed=d.seed,
                   num_epochs=config.epochs, max_len=d.max_len, buckets=buckets_for(d.max_len),
                   train_on_prompts=d.train_on_prompt)


def dev_batches_for(config: TrainConfig, tokenizer: Tokenizer) -> Batches | None:
    """One pass over the dataset's dev split, batched like training (LIMA App. B compares dev
    perplexity with quality across epochs), or None if it has none."""
    d = config.data
    if d.path is None or "dev" not in split_names(d.path):
        return None
    return Batches(load(d.path, "dev"), tokenizer, batch_size=d.batch_size, seed=d.seed,
                   num_epochs=1, max_len=d.max_len, buckets=buckets_for(d.max_len),
                   train_on_prompts=d.train_on_prompt)
