"""Exact-batch packing (DESIGN §4): a step's dialogues laid into few rows with segment ids give the
padded step's loss and gradients, never see each other, and cost about a third of the tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts
from flax import nnx

from limajax import data, sharding
from limajax.config import BUCKETS, apply_overrides, preset
from limajax.model import token_nll

T = 256  # rows of 256 tokens: real LIMA dialogues, the longer ones trimmed as in training


@pytest.fixture(scope="module")
def dialogues(lima_rows, llama_tokenizer):
    """Eight real LIMA dialogues of varied lengths (one trimmed, one multi-turn)."""
    lengths = [len(llama_tokenizer.encode_dialogue(r["conversations"], max_len=10**6).ids)
               for r in lima_rows]
    order = np.argsort(lengths, kind="stable")
    short = [int(i) for i in order if lengths[i] <= T]
    picks = short[:: len(short) // 6][:6]  # 6 lengths spread from the shortest to ~T
    picks += [int(order[-1])]  # the longest: trimmed to T
    picks += [next(i for i, r in enumerate(lima_rows) if len(r["conversations"]) > 2)]
    return [lima_rows[i] for i in picks]


def global_batch(dialogues, tokenizer, pack: bool, data_axis: int = 1):
    batches = data.Batches(dialogues, tokenizer, batch_size=len(dialogues), max_len=T,
                           buckets=(T,), pack=pack, row_multiple=data_axis, process_index=0,
                           process_count=1, read_options=None)
    return batches.collate([batches.encode(d) for d in dialogues])


@pytest.fixture(scope="module")
def model_config(llama_tokenizer):
    return preset("tiny").replace(n_layers=2, vocab_size=llama_tokenizer.vocab_size)


def loss_and_grads(config, mesh, batch):
    """LIMA's loss (mean over target tokens) and its gradient, on `mesh`."""
    model = sharding.init_model(config, mesh, seed=1)
    graphdef, params = nnx.split(model)

    def loss(params, b):
        logits = nnx.merge(graphdef, params)(b["inputs"], b["positions"],
                                             segment_ids=b["segment_ids"])
        return jnp.sum(token_nll(logits, b["targets"]) * b["loss_mask"]) / jnp.sum(
            b["loss_mask"])

    placed = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    with sharding.activate(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(params, placed)
    return float(value), nnx.to_pure_dict(jax.device_get(grads))


def test_the_packed_layout(dialogues, llama_tokenizer):
    packed = global_batch(dialogues, llama_tokenizer, pack=True)
    padded = global_batch(dialogues, llama_tokenizer, pack=False)
    assert padded["inputs"].shape == (8, T) and packed["inputs"].shape[0] < 8
    # The same tokens, loss mask and positions, dialogue by dialogue, in both layouts.
    for k in data.BATCH_KEYS:
        for b in (packed, padded):
            assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    pieces = {}
    for name, b in (("packed", packed), ("padded", padded)):
        got = []
        for r in range(len(b["inputs"])):
            for s in range(1, b["segment_ids"][r].max() + 1):
                at = b["segment_ids"][r] == s
                assert (b["positions"][r, at] == np.arange(at.sum())).all()  # restart per dialogue
                got.append(tuple(np.concatenate([b[k][r, at] for k in data.BATCH_KEYS[:3]])))
            pad = b["segment_ids"][r] == 0
            assert not b["inputs"][r, pad].any() and not b["loss_mask"][r, pad].any()
        pieces[name] = sorted(got)
    assert pieces["packed"] == pieces["padded"] and len(pieces["packed"]) == 8
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum()


@pytest.mark.parametrize("mesh_shape", ["1x1", "2x4"])
def test_a_packed_batch_gives_the_padded_loss_and_gradients(dialogues, llama_tokenizer,
                                                            model_config, mesh_shape):
    mesh = sharding.single_device_mesh() if mesh_shape == "1x1" else sharding.make_mesh("2x4")
    data_axis = mesh.shape["data"]
    packed = global_batch(dialogues, llama_tokenizer, True, data_axis)
    padded = global_batch(dialogues, llama_tokenizer, False, data_axis)
    assert len(packed["inputs"]) % data_axis == 0
    loss_packed, g_packed = loss_and_grads(model_config, mesh, packed)
    loss_padded, g_padded = loss_and_grads(model_config, mesh, padded)
    # float32 throughout; only the order of the sums differs between the layouts.
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5, abs=1e-5)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_padded), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_no_token_attends_across_a_segment(dialogues, llama_tokenizer, model_config):
    batch = global_batch(dialogues, llama_tokenizer, pack=True)
    row = int(np.argmax(batch["segment_ids"].max(axis=1)))  # a row holding several dialogues
    assert batch["segment_ids"][row].max() >= 2
    graphdef, params = nnx.split(
        sharding.init_model(model_config, sharding.single_device_mesh(), seed=1))
    run = jax.jit(lambda params, t, p, s: nnx.merge(graphdef, params)(t, p, segment_ids=s))

    def forward(tokens, positions, segments):
        return run(params, tokens, positions, segments)

    before = np.asarray(forward(batch["inputs"], batch["positions"], batch["segment_ids"]))
    changed = batch["inputs"].copy()
    first = batch["segment_ids"][row] == 1
    changed[row, first] = (changed[row, first] + 7) % model_config.vocab_size
    after = np.asarray(forward(changed, batch["positions"], batch["segment_ids"]))
    others = np.ones(batch["inputs"].shape, bool)
    others[row, first] = False
    np.testing.assert_array_equal(after[others], before[others])  # bit for bit
    assert not np.allclose(after[row, first], before[row, first])


def test_three_steps_packed_and_unpacked_agree():
    # Dropout off: its masks are drawn per array element, so the two layouts draw different
    # (equally distributed) masks; everything else is the same computation.
    config = ts.tiny_config(mesh="2x4", dropout=0.0)
    mesh = sharding.make_mesh("2x4")
    losses, params = ts.three_steps(config, mesh)
    ref_losses, ref = ts.three_steps(apply_overrides(config, ["data.pack=false"]), mesh)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], atol=1e-5, err_msg=k)


def test_lima_packed_epoch_costs_at_most_40_percent_of_padded(lima_dataset, llama_tokenizer):
    """LIMA §3's batch 32 and 2048 tokens, the real dialogues and LLaMA tokenizer, epoch 1."""
    source = data.load(lima_dataset, "train")
    lengths = [len(llama_tokenizer.encode_dialogue(data.conversations(source[i])).ids)
               for i in range(len(source))]
    tokens = {}
    for pack in (True, False):
        batches = data.Batches(source, llama_tokenizer, batch_size=32, pack=pack,
                               process_index=0, process_count=1)
        shapes = batches.shapes(0, lengths)
        assert len(shapes) == 33 and all(t in BUCKETS for _, t in shapes)
        tokens[pack] = sum(r * t for r, t in shapes)
    assert tokens[False] == 2_162_688  # 32 of 33 batches need the 2048 bucket
    assert tokens[True] == 765_952  # 35.4% of the padded tokens: packed <= 40%
    assert tokens[True] <= 0.40 * tokens[False]
    # A data axis of 8 rounds each batch's ~11 rows up to 16: 49%, still a half saved.
    wide = data.Batches(source, llama_tokenizer, batch_size=32, row_multiple=8,
                        process_index=0, process_count=1)
    assert sum(r * t for r, t in wide.shapes(0, lengths)) <= 0.5 * tokens[False]


def test_rows_split_evenly_over_processes_and_data_axis(dialogues, llama_tokenizer):
    whole = data.Batches(dialogues, llama_tokenizer, batch_size=8, max_len=T, buckets=(T,),
                         row_multiple=2, process_index=0, process_count=1, read_options=None)
    full = whole.collate([whole.encode(d) for d in dialogues])
    parts = []
    for i in range(2):
        part = data.Batches(dialogues, llama_tokenizer, batch_size=8, max_len=T, buckets=(T,),
                            row_multiple=2, process_index=i, process_count=2, read_options=None)
        parts.append(part.collate([part.encode(d) for d in dialogues]))
    assert len(full["inputs"]) % 2 == 0
    for k in data.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    assert [data.batches.row_count(n, 2, 32) for n in (1, 3, 9, 11, 13, 17, 40)] == [
        2, 4, 10, 12, 14, 20, 32]
