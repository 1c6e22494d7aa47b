"""The LIMA recipe (LIMA §3), the step's loss, and that training learns and shards exactly."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts
from flax import nnx

from limajax import data, optim, sharding, train, workdir
from limajax.config import (
    MAX_LEN,
    DataConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    preset,
)
from limajax.errors import UserError
from limajax.model import token_nll


def test_lima_step_count_and_schedule():
    # LIMA §3: 1,000 examples, batch 32, 15 epochs. The short last batch (8 real rows + 24
    # padding rows) is kept, so an epoch is ceil(1000 / 32) = 32 steps and the run 480 steps.
    steps = data.steps_per_epoch(1000, 32)
    assert steps == 32
    total = 15 * steps
    assert total == 480
    lr = optim.schedule(OptimConfig(), total)
    assert float(lr(0)) == pytest.approx(1e-5, rel=1e-6)  # no warm-up
    assert float(lr(total - 1)) == pytest.approx(1e-6, rel=1e-5)  # 1e-6 at the last step
    expected = np.linspace(1e-5, 1e-6, total)
    got = np.array([float(lr(s)) for s in range(total)])
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # linear in between


def test_recipes_resolve_to_lima_settings():
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    c7 = runpy.run_path(str(root / "lima_7b.py"))["config"]
    c65 = runpy.run_path(str(root / "lima_65b.py"))["config"]
    node = runpy.run_path(str(root / "lima_65b_h200.py"))["config"]  # one 8x H200 node
    for c in (c7, c65, node):
        # LIMA §3's optimizer, epochs and length are the defaults (their values are tested
        # above); a recipe states only what differs, and what follows from it must hold.
        # (moments_dtype and host_offload are memory choices: the update is the same.)
        defaults = TrainConfig(model=c.model)
        lima = dataclasses.replace(c.optim, moments_dtype=defaults.optim.moments_dtype,
                                   host_offload=defaults.optim.host_offload)
        assert (lima, c.epochs, c.data.max_len) == (defaults.optim, defaults.epochs, MAX_LEN)
        data_axis, _ = sharding.parse_mesh(c.mesh)
        assert c.data.batch_size % (data_axis * c.data.accumulation_steps) == 0
        total = c.epochs * data.steps_per_epoch(1000, c.data.batch_size)  # LIMA's 1,000
        lr = optim.schedule(c.optim, total)
        assert float(lr(total - 1)) == pytest.approx(c.optim.end_lr, rel=1e-5)
    assert (c7.data.batch_size, c7.dropout) == (64, 0.2)
    assert (c65.data.batch_size, c65.dropout, c65.mesh) == (32, 0.3, "8x8")
    assert (node.data.batch_size, node.dropout, node.mesh) == (32, 0.3, "1x8")
    # LIMA's update: float32 master weights (an update of 1e-5 must not round away)
    assert node.model.param_dtype == "float32" and node.model == c65.model
    for c in (c7, c65, node):
        assert c.optim.schedule == "linear"  # LIMA's recipes keep LIMA's schedule


def test_alpaca_recipes_are_stanfords():
    """configs/alpaca_*.py: Stanford Alpaca's published recipe (3 epochs, 2e-5, 3% warm-up,
    cosine, batch 128, length 512, no weight decay); 65B takes 1e-5 (not stated anywhere)."""
    import runpy

    root = Path(__file__).resolve().parents[1] / "configs"
    c7 = runpy.run_path(str(root / "alpaca_7b.py"))["config"]
    c65 = runpy.run_path(str(root / "alpaca_65b.py"))["config"]
    for c, lr in ((c7, 2e-5), (c65, 1e-5)):
        assert (c.epochs, c.optim.lr, c.optim.end_lr, c.optim.schedule, c.optim.warmup_ratio,
                c.optim.weight_decay, c.data.batch_size, c.data.max_len, c.dropout) == (
            3, lr, 0.0, "cosine", 0.03, 0.0, 128, 512, 0.0)
        assert (c.optim.b1, c.optim.b2, c.optim.clip_norm) == (0.9, 0.999, 1.0)
    assert c65.model.dim == 8192 and c7.model.dim == 4096
    with pytest.raises(UserError, match="schedule must be one of linear, cosine"):
        OptimConfig(schedule="step")
    with pytest.raises(UserError, match="warmup_steps or warmup_ratio, not both"):
        OptimConfig(warmup_steps=3, warmup_ratio=0.03)
    # Alpaca's 52,002 rows: 407 steps an epoch, 1,221 in all, 37 of them warm-up (rounded up,
    # as transformers rounds), then transformers' cosine: 0.5 (1 + cos(pi (s - 37) / 1184)).
    total = 3 * data.steps_per_epoch(52002, 128)
    assert (total, optim.warmup_steps(c7.optim, total)) == (1221, 37)
    lr = optim.schedule(c7.optim, total)
    for step in (0, 10, 37, 600, 1220):
        hf = 2e-5 * (step / 37 if step < 37 else 0.5 * (1 + np.cos(np.pi * (step - 37) / 1184)))
        assert float(lr(step)) == pytest.approx(hf, rel=1e-5, abs=1e-12)


def test_a_tiny_alpaca_recipe_run_follows_optax_warmup_cosine(tmp_path):
    """A real run with alpaca_7b.py's optimiser on the tiny model: the rate each step used, as
    metrics.jsonl logs it, is optax.warmup_cosine_decay_schedule's at step 0, at the end of the
    warm-up and at the last step."""
    import optax
    from click.testing import CliRunner

    from limajax.cli import main

    root = Path(__file__).resolve().parents[1] / "configs"
    recipe = tmp_path / "alpaca_tiny.py"
    recipe.write_text(
        "import dataclasses, runpy\n"
        f"alpaca = runpy.run_path({str(root / 'alpaca_7b.py')!r})['config']\n"
        f"tiny = runpy.run_path({str(root / 'tiny.py')!r})['config']\n"
        "config = dataclasses.replace(tiny, optim=dataclasses.replace(alpaca.optim, lr=1e-3),\n"
        "                             epochs=alpaca.epochs, dropout=alpaca.dropout)\n")
    r = CliRunner().invoke(main, ["train", "--config", str(recipe), "--no-progress", "--workdir",
                                  str(tmp_path / "w"), "--set", "data.max_len=64",
                                  "--set", "optim.warmup_ratio=0.2", "--peak-flops", "1e12"])
    assert r.exit_code == 0, r.output
    logged = [json.loads(x)["lr"] for x in (tmp_path / "w" / "metrics.jsonl").read_text()
              .splitlines()]
    total, warmup = 18, 4  # 48 sample dialogues / batch 8 = 6 steps x 3 epochs; ceil(0.2 x 18)
    assert len(logged) == total
    reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, total, 0.0)
    for step in (0, warmup, total - 1):
        # computed in float32 inside the step: 1e-5 of a rate near 0
        assert logged[step] == pytest.approx(float(reference(step)), rel=1e-5, abs=1e-12)
    assert logged[0] == 0.0 and logged[warmup] == pytest.approx(1e-3)
    assert 0 < logged[-1] < logged[-2] < 1e-4  # decaying to 0 at step 18, one past the last


def test_weight_decay_touches_matrices_only():
    config = preset("tiny").replace(n_layers=2)
    mesh = sharding.single_device_mesh()
    _, abstract = sharding.abstract_model(config, mesh)
    mask = optim.decay_mask(abstract)
    assert mask["layers"]["attention"]["wq"]["kernel"] is True
    assert mask["tok_embeddings"]["embedding"] is True and mask["output"]["kernel"] is True
    # Stacked norm scales are 2-D [L, D] but not matrices.
    assert mask["layers"]["attention_norm"]["scale"] is False and mask["norm"]["scale"] is False
    # With zero gradients Adam's update is 0, so only decoupled weight decay moves parameters.
    params = nnx.to_pure_dict(nnx.state(sharding.init_model(config, mesh)))
    tx = optim.optimizer(OptimConfig(), 10, mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    shrink = 1 - 1e-5 * 0.1
    np.testing.assert_allclose(new["layers"]["feed_forward"]["w1"]["kernel"],
                               params["layers"]["feed_forward"]["w1"]["kernel"] * shrink,
                               rtol=1e-6)
    np.testing.assert_array_equal(new["layers"]["ffn_norm"]["scale"],
                                  params["layers"]["ffn_norm"]["scale"])


def test_dropout_rises_with_depth_and_evaluation_is_deterministic():
    rates = train.dropout_rates(4, 0.3)
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3], atol=1e-7)
    assert float(rates[0]) == 0.0 and float(rates[-1]) == pytest.approx(0.3)
    model = sharding.init_model(preset("tiny").replace(n_layers=4), sharding.single_device_mesh())
    tokens = jnp.arange(16).reshape(2, 8) % 500
    a, b = model(tokens), model(tokens)  # evaluation and sampling: no dropout arguments
    np.testing.assert_array_equal(a, b)
    # (test_model.py checks that the rates drop out per layer and only with a key.)


@pytest.fixture(scope="module")
def step_setup():
    config = ts.tiny_config(mesh="2x4", dropout=0.0)
    mesh = sharding.make_mesh("2x4")
    params = nnx.to_pure_dict(nnx.state(sharding.init_model(config.model, mesh)))
    batch = next(iter(ts.KillableLoader(config, ts.rows())))
    return config, mesh, params, batch


def _one_step(config, mesh, params, batch):
    setup = train.build(config, mesh, steps_per_epoch=2)
    params = jax.tree.map(jnp.copy, params)  # the step donates its input
    with sharding.activate(mesh):
        state, metrics = train.make_train_step(setup)(train.init_state(setup, params),
                                                      train.put_batch(batch, setup))
    return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


def test_loss_is_the_global_target_token_mean(step_setup):
    config, mesh, params, batch = step_setup
    _, m = _one_step(config, mesh, params, batch)
    model = nnx.merge(sharding.abstract_model(config.model, mesh)[0], params)
    logits = model(batch["inputs"], batch["positions"], segment_ids=batch["segment_ids"])
    nll = token_nll(logits, batch["targets"])
    expected = float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["target_tokens"] == batch["loss_mask"].sum()
    assert m["lr"] == pytest.approx(1e-3)

    # Accumulating over 2 micro batches of 4 dialogues (packed: 2 rows each) gives the same
    # loss and the same update.
    accum = apply_overrides(config, ["data.micro_batch_size=4"])
    p1, _ = _one_step(config, mesh, params, batch)
    p2, m2 = _one_step(accum, mesh, params, batch)
    assert m2["loss"] == pytest.approx(m["loss"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # A short last batch: the second half of the rows is all padding; the loss is the mean
    # over the first half only.
    half = len(batch["inputs"]) // 2
    short = {k: v.copy() for k, v in batch.items()}
    for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids"):
        short[k][half:] = 0
    _, m3 = _one_step(config, mesh, params, short)
    nll = np.asarray(nll)
    mask = batch["loss_mask"][:half]
    assert m3["loss"] == pytest.approx(float((nll[:half] * mask).sum() / mask.sum()), rel=1e-5)


def test_it_learns(tmp_path, monkeypatch):
    """The tiny model memorises the eight dialogues: target-token loss below 0.1."""
    # Sixty one-step epochs would spend two thirds of this test drawing curves.png at each
    # epoch's end (test_workdir's test_dev_loss_and_curves_at_every_epoch_end checks those).
    monkeypatch.setattr(train, "plot_curves", lambda workdir: None)
    config = ts.tiny_config(
        mesh="1x1", epochs=60, dropout=0.0, optim=OptimConfig(lr=1e-2, end_lr=1e-3),
        data=DataConfig(batch_size=8, max_len=80))
    loader = ts.KillableLoader(config, ts.rows(8))
    metrics = train.train(config, tmp_path, loader, mesh=sharding.single_device_mesh(),
                        progress=False, peak=1e12)
    assert metrics[0]["loss"] > 4.0
    assert metrics[-1]["loss"] < 0.1, [m["loss"] for m in metrics[::10]]
    # The workdir contract (DESIGN §3).
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 60
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "time"} <= set(
        lines[0])
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_sharded_equals_unsharded(tmp_path):
    config = ts.tiny_config()  # dropout 0.2 on: the masks must not depend on the mesh either
    ref_losses, ref = ts.three_steps(config, sharding.single_device_mesh())
    losses, params = ts.three_steps(config, sharding.make_mesh("2x4"))
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], atol=1e-5, err_msg=k)
    # 8x8 on 64 simulated devices, in a subprocess (the device count is fixed per process).
    out = tmp_path / "out.npz"
    proc = ts.run_script(tmp_path, "8x8", 64, "three_steps", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(out)
    np.testing.assert_allclose(got["__losses__"], ref_losses, atol=1e-5, rtol=1e-5)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, err_msg=k)


def test_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    config = ts.tiny_config(save_every_steps=1, epochs=2)

    class Poisoned(ts.KillableLoader):
        at = 2  # the third step sees a NaN

        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if i == self.at:
                    batch["loss_mask"] = batch["loss_mask"] * np.nan
                yield batch

    with pytest.raises(train.Diverged, match="at step 3 .*last good checkpoint is step 2 in "
                       f"{tmp_path / 'checkpoints'}"):
        train.train(config, tmp_path, Poisoned(config, ts.rows()), progress=False, peak=1e12)
    assert [m["step"] for m in workdir.checkpoints(tmp_path)] == [1, 2]
    Poisoned.at = 0  # before any checkpoint: said so, not "step None"
    with pytest.raises(train.Diverged, match="at step 1 .*no checkpoint was saved before it"):
        train.train(config, tmp_path / "first", Poisoned(config, ts.rows()), progress=False,
                    peak=1e12)


def test_bad_setups_are_user_errors(tmp_path):
    config = ts.tiny_config()
    with pytest.raises(UserError, match="batch_size 6 does not divide across the data axis"):
        sharding.check(apply_overrides(config, ["data.batch_size=6"]), sharding.make_mesh("4x2"))
    with pytest.raises(UserError, match="n_heads 2 does not divide across the model axis"):
        sharding.check(apply_overrides(config, ["model.n_kv_heads=2", "model.n_heads=2"]),
                       sharding.make_mesh("2x4"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    other = apply_overrides(config, ["optim.lr=2e-5"])
    with pytest.raises(UserError, match="holds another run's checkpoints .*optim.lr"):
        workdir.check_config(tmp_path, other)
    workdir.check_config(tmp_path, apply_overrides(config, ["mesh=1x1"]))  # a new mesh is fine


def test_the_loop_syncs_only_at_the_log_cadence_and_prefetches(tmp_path, monkeypatch):
    """Properties, not a call order: the host waits for metrics only at the log points (every
    log_every_steps steps, and the epoch's end), and each next batch goes to the devices once
    its predecessor's step is dispatched, with nothing waiting for that step first."""
    dispatched, synced, puts, syncs = [0], [0], [], []
    put, host, make = train.put_batch, train.host_metrics, train.make_train_step

    def make_step(setup):
        step = make(setup)

        def counted(*args):
            dispatched[0] += 1
            return step(*args)
        return counted

    def put_batch(*args):
        puts.append((dispatched[0], synced[0]))
        return put(*args)

    def host_metrics(pending, *args):
        synced[0] = pending[-1][0]
        syncs.append(synced[0])
        return host(pending, *args)

    monkeypatch.setattr(train, "put_batch", put_batch)
    monkeypatch.setattr(train, "host_metrics", host_metrics)
    monkeypatch.setattr(train, "make_train_step", make_step)
    config = ts.tiny_config(mesh="1x1", epochs=1, log_every_steps=4)
    logged = train.train(config, tmp_path, ts.KillableLoader(config, ts.rows(48)),
                         mesh=sharding.single_device_mesh(), progress=False, peak=1e12)
    steps = [m["step"] for m in logged]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step's metrics arrive, late
    log_points = [s for s in steps if s % config.log_every_steps == 0 or s == steps[-1]]
    assert syncs == log_points == [4, 6]
    assert [m["step"] for m in workdir.read_metrics(tmp_path)] == [4]
    assert [d for d, _ in puts] == list(range(len(steps)))  # batch k+1 right after step k
    assert all(s < d for d, s in puts[1:])  # ...and no transfer waited for that step


def test_bfloat16_moments_halve_the_optimizer_state_and_track_float32():
    params = {"w": jnp.ones((64, 64)), "scale": jnp.ones((64,))}
    mask = {"w": True, "scale": False}
    grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i), p.shape) * 1e-2,
                          params) for i in range(3)]
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = optim.optimizer(OptimConfig(moments_dtype=dtype), 10, mask)
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = jax.tree.map(jnp.add, p, updates)
        moments = [x for x in jax.tree.leaves(state) if x.ndim]
        assert {x.dtype for x in moments} == {jnp.dtype(dtype)} and len(moments) == 4
        assert p["w"].dtype == jnp.float32  # master weights stay float32
        out[dtype] = p
    # Three updates of ~lr = 1e-5 each: with bfloat16 moments (8-bit mantissa) the weights end
    # within two float32 ulps of 1.0 (2.4e-7, a fortieth of one update) of the float32 run.
    moved = np.abs(np.asarray(out["float32"]["w"]) - 1.0).max()
    assert 2e-5 < moved < 4e-5
    np.testing.assert_allclose(out["bfloat16"]["w"], out["float32"]["w"], rtol=0, atol=2.4e-7)


def test_gradients_added_in_place_equal_the_summed_step():
    """With remat full the layers' backward pass adds each micro batch's gradient into the
    running sum (model.layers_adding_into); with remat none the step sums whole gradient trees
    as autodiff gives them. Over three steps of 2 micro batches they agree within 1e-6."""
    config = ts.tiny_config(mesh="2x4", data=DataConfig(batch_size=8, max_len=80,
                                                          micro_batch_size=4))
    assert config.data.accumulation_steps == 2 and config.model.remat == "full"
    mesh = sharding.make_mesh("2x4")
    losses, params = ts.three_steps(config, mesh)
    losses_s, params_s = ts.three_steps(apply_overrides(config, ["model.remat=none"]), mesh)
    np.testing.assert_allclose(losses, losses_s, rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_s), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_host_offloaded_moments_equal_the_on_device_step():
    """optim.host_offload keeps AdamW's moments in pinned host memory between steps (the CPU
    backend has memory kinds too): three steps equal the on-device AdamW within 1e-6."""
    config = ts.tiny_config(mesh="2x4")
    mesh = sharding.make_mesh("2x4")
    losses, params = ts.three_steps(config, mesh)
    offload = apply_overrides(config, ["optim.host_offload=true"])
    setup = train.build(offload, mesh, steps_per_epoch=3)
    kinds = {s.memory_kind for s in jax.tree.leaves(setup.state_shardings.opt_state)}
    assert kinds == {"pinned_host"}
    losses_h, params_h = ts.three_steps(offload, mesh)
    np.testing.assert_allclose(losses_h, losses, rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params_h), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
