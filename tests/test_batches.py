"""The input pipeline on the real LIMA dialogues: epochs, padding, buckets, hosts and resuming.
(The packed layout itself is tested in test_packing.py; here the one-dialogue-per-row layout
shows the order and contents plainly, and hosts and resuming run packed, the default.)"""

import itertools

import numpy as np
import pytest

from limajax import data
from limajax.config import BUCKETS
from limajax.errors import UserError
from limajax.train import BATCH_KEYS as KEYS


@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    return llama_tokenizer


@pytest.fixture(scope="module")
def source(lima_dataset):
    return data.load(lima_dataset, "train")


@pytest.fixture(scope="module")
def subset(source):
    """A third of the real dialogues (multi-turn ones included), for the costlier tests."""
    return [source[i] for i in range(0, len(source), 3)]


@pytest.fixture(scope="module")
def encoded(source, tok):
    """Each example's ids, encoded directly: a row's targets identify its example."""
    return [tok.encode_dialogue(data.conversations(source[i])) for i in range(len(source))]


@pytest.fixture(scope="module")
def example_of(encoded):
    keys = {e.ids[1:].tobytes(): i for i, e in enumerate(encoded)}
    assert len(keys) == len(encoded)  # every example distinct, so rows can be told apart
    assert all((e.ids != 0).all() for e in encoded)  # id 0 marks padding only
    return keys


def loader(source, tok, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return data.Batches(source, tok, **kw)


def rows(batch, example_of):
    """The example index of each dialogue, row by row (None for an all-padding row)."""
    out = []
    for targets, segments in zip(batch["targets"], batch["segment_ids"], strict=True):
        out += [example_of[targets[segments == s].tobytes()] for s in range(1, segments.max() + 1)]
        out += [] if segments.any() else [None]
    return out


def same(a, b):
    return all(a[k].shape == b[k].shape and (a[k] == b[k]).all() for k in KEYS)


def test_three_epochs_each_see_every_example_once_in_new_orders(source, tok, encoded, example_of):
    batches = loader(source, tok, num_epochs=3, seed=7, pack=False)
    assert batches.steps_per_epoch == 33  # ceil(1029 / 32): the short batch is kept
    got = list(batches)
    assert len(got) == 99 and batches.get_state() == {"epoch": 3, "index": 0}
    orders, total_loss = [], 0.0
    for epoch in range(3):
        epoch_rows = [r for b in got[33 * epoch: 33 * (epoch + 1)] for r in rows(b, example_of)]
        real = [r for r in epoch_rows if r is not None]
        assert sorted(real) == list(range(1029))  # each example exactly once
        assert epoch_rows[1029:] == [None] * (33 * 32 - 1029)  # padding rows fill the last batch
        assert real == batches.order(epoch)
        orders.append(real)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    again = itertools.islice(loader(source, tok, seed=7, pack=False), 33)  # a new loader
    assert [r for b in again for r in rows(b, example_of) if r is not None] == orders[0]
    assert loader(source, tok, seed=8).order(0) != orders[0]

    for b in got[:33]:
        assert b["inputs"].dtype == b["targets"].dtype == b["positions"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        assert all(b[k].shape == (32, 2048) for k in KEYS)
        for i, r in enumerate(rows(b, example_of)):
            if r is None:
                assert not b["inputs"][i].any() and not b["loss_mask"][i].any()
                continue
            ids, mask, _ = encoded[r]
            n = len(ids) - 1
            assert (b["inputs"][i, :n] == ids[:-1]).all() and not b["inputs"][i, n:].any()
            assert (b["loss_mask"][i, :n] == mask[1:]).all() and not b["loss_mask"][i, n:].any()
            assert (b["positions"][i, :n] == np.arange(n)).all() and not b["positions"][i, n:].any()
            assert (b["segment_ids"][i, :n] == 1).all() and not b["segment_ids"][i, n:].any()
        total_loss += b["loss_mask"].sum()
    # Every assistant token and its EOT is a target exactly once per epoch: the loss
    # normaliser (sum of loss_mask) counts real targets only.
    assert total_loss == sum(int(e.loss_mask.sum()) for e in encoded)


def test_batches_use_the_smallest_bucket_that_holds_the_longest_row(source, tok, example_of):
    shapes = set()
    for b in loader(source, tok, batch_size=2, num_epochs=1, pack=False):
        longest = max(np.count_nonzero(t) for t in b["targets"])
        t = b["inputs"].shape[1]
        assert t == min(x for x in BUCKETS if x >= longest)
        shapes.add(b["inputs"].shape)
    assert shapes == {(2, 256), (2, 512), (2, 1024), (2, 2048)}


def test_drop_remainder_drops_the_short_batch(source, tok):
    batches = loader(source, tok, batch_size=100, drop_remainder=True, num_epochs=1, pack=False)
    assert batches.steps_per_epoch == 10 == data.steps_per_epoch(1029, 100, drop_remainder=True)
    assert data.steps_per_epoch(1029, 100) == 11
    got = list(batches)
    assert len(got) == 10 and all((b["loss_mask"].sum(axis=1) > 0).all() for b in got)


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_gets_a_disjoint_slice_and_together_the_global_batch(
    subset, tok, example_of, processes
):
    kw = dict(batch_size=16, seed=3, num_epochs=1, row_multiple=processes)  # packed
    whole = list(loader(subset, tok, **kw))
    parts = [list(loader(subset, tok, process_index=i, process_count=processes, **kw))
             for i in range(processes)]
    assert all(len(p) == len(whole) == 22 for p in parts)  # ceil(343 / 16)
    for step, global_batch in enumerate(whole):
        slices = [p[step] for p in parts]
        assert all(s["inputs"].shape == (len(global_batch["inputs"]) // processes,
                                         global_batch["inputs"].shape[1])
                   for s in slices)  # every process agrees on the rows and the bucket
        joined = {k: np.concatenate([s[k] for s in slices]) for k in KEYS}
        assert same(joined, global_batch)
        seen = [set(rows(s, example_of)) - {None} for s in slices]
        assert sum(len(s) for s in seen) == len(set().union(*seen))  # disjoint


def test_restoring_a_position_yields_exactly_the_remaining_batches(subset, tok):
    kw = dict(batch_size=32, seed=11, num_epochs=2)
    uninterrupted = list(loader(subset, tok, **kw))
    assert len(uninterrupted) == 2 * 11  # ceil(343 / 32) per epoch

    first = loader(subset, tok, **kw)
    head = list(itertools.islice(first, 11 + 4))  # through epoch 0, into the middle of epoch 1
    state = first.get_state()
    assert state == {"epoch": 1, "index": 4}
    resumed = loader(subset, tok, **kw)
    resumed.set_state(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(uninterrupted)
    assert all(same(a, b) for a, b in zip(head + tail, uninterrupted, strict=True))

    resumed.set_state({"epoch": 0, "index": 11})  # the end of an epoch is the next's start
    assert resumed.get_state() == {"epoch": 1, "index": 0}
    with pytest.raises(UserError, match="does not fit"):
        resumed.set_state({"epoch": 0, "index": 12})


def test_setup_mistakes_are_user_errors(source, tok):
    with pytest.raises(UserError, match="does not split over 3 processes"):
        loader(source, tok, batch_size=32, process_count=3)
    with pytest.raises(UserError, match="no full batch"):
        loader(source, tok, batch_size=2000, drop_remainder=True)
    with pytest.raises(UserError, match="largest length bucket"):
        loader(source, tok, buckets=(256, 512))
