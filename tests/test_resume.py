"""Exact resume after SIGKILL (mid-epoch and mid-save) and restoring onto other meshes."""

import json

import jax
import numpy as np
import pytest
import train_support as ts

from limajax import checkpoint, sharding, train, workdir

ROWS = 32  # 4 steps per epoch, 3 epochs: 12 steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run on 2x4: (workdir, metrics, final params)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    config = ts.tiny_config()
    metrics = train.train(config, run_dir, ts.KillableLoader(config, ts.rows(ROWS)), progress=False,
                          peak=1e12)
    return run_dir, metrics


def _final_params(run_dir, mesh):
    config = ts.tiny_config()
    setup = train.build(config, mesh, ts.KillableLoader(config, ts.rows(ROWS)).steps_per_epoch)
    with workdir.checkpoint_manager(run_dir) as manager:
        state, meta = workdir.restore_state(manager, manager.latest_step(), setup.abstract_state)
    return state, meta


def test_killed_runs_resume_exactly(reference, tmp_path):
    ref_dir, ref_metrics = reference
    # 1. SIGKILL in the middle of epoch 2 (its 3rd batch), once epoch 1's checkpoint is written.
    p = ts.run_script(tmp_path, "2x4", 8, "kill=1.2", "wait=4", f"rows={ROWS}")
    assert p.returncode == -9, p.stderr[-2000:]
    assert [m["step"] for m in workdir.checkpoints(tmp_path)] == [4]
    # 2. Resume; SIGKILL again just after epoch 2's asynchronous save has started.
    p = ts.run_script(tmp_path, "2x4", 8, "kill=2.0", f"rows={ROWS}")
    assert p.returncode == -9, p.stderr[-2000:]
    assert "resuming from the checkpoint at step 4" in p.stderr
    partial = [d.name for d in (tmp_path / "checkpoints").iterdir() if "tmp" in d.name]
    assert partial, "the step-8 save completed before the kill: nothing partial to ignore"
    # 3. Resume again (here): the half-written step-8 save is ignored, step 4 is used.
    config = ts.tiny_config()
    metrics = train.train(config, tmp_path, ts.KillableLoader(config, ts.rows(ROWS)),
                          progress=False, peak=1e12)
    assert metrics[0]["step"] == 5, (partial, metrics[0])  # resumed from step 4
    assert not [d for d in (tmp_path / "checkpoints").iterdir() if "tmp" in d.name]
    assert [m["step"] for m in workdir.checkpoints(tmp_path)] == [4, 8, 12]

    # Bitwise-equal parameters and optimiser state, and the same metrics after the resume.
    mesh = sharding.make_mesh("2x4")
    got, _ = _final_params(tmp_path, mesh)
    want, _ = _final_params(ref_dir, mesh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logged = workdir.read_metrics(tmp_path)
    assert [m["step"] for m in logged] == list(range(1, 13))
    keys = ("step", "epoch", "loss", "lr", "grad_norm", "target_tokens")
    assert [{k: m[k] for k in keys} for m in logged] == [
        {k: m[k] for k in keys} for m in ref_metrics]


def test_checkpoint_restores_onto_other_meshes(reference):
    ref_dir, _ = reference
    want, meta = _final_params(ref_dir, sharding.make_mesh("2x4"))
    assert meta["data"] == {"epoch": 3, "index": 0} and meta["end_of_epoch"]
    assert meta["config"]["mesh"] == "2x4"
    for mesh in (sharding.make_mesh("4x2"), sharding.single_device_mesh()):
        got, _ = _final_params(ref_dir, mesh)
        wq = got.params["layers"]["attention"]["wq"]["kernel"]
        assert wq.sharding.mesh.shape == mesh.shape
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_epoch_checkpoint_becomes_a_model_directory(reference, tmp_path):
    ref_dir, _ = reference
    want, _ = _final_params(ref_dir, sharding.single_device_mesh())
    assert workdir.epoch_step(ref_dir, 3) == 12
    with pytest.raises(checkpoint.UserError, match="no checkpoint for epoch 7"):
        workdir.epoch_step(ref_dir, 7)
    # config.json of the test run names no tokenizer: give it one, as `limajax train` would.
    config = json.loads((ref_dir / "config.json").read_text())
    (ref_dir / "config.json").write_text(json.dumps(config | {"tokenizer": str(ts.TOKENIZER)}))
    out = checkpoint.save_epoch_model_dir(ref_dir, 3, tmp_path / "model", command="test")
    params, model_config, tokens = checkpoint.load_model_dir(out)
    assert model_config == ts.tiny_config().model and tokens.eot_id == 512
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_commands_read_a_workdir_epoch_like_a_model_directory(reference, tmp_path):
    """DESIGN §3: `--workdir W --epoch N` is accepted wherever `--model` is."""
    from click.testing import CliRunner

    from limajax.cli import main

    ref_dir, _ = reference
    config = json.loads((ref_dir / "config.json").read_text())
    (ref_dir / "config.json").write_text(json.dumps(config | {"tokenizer": str(ts.TOKENIZER)}))
    model_dir = checkpoint.save_epoch_model_dir(ref_dir, 2, tmp_path / "model",
                                                  command="test")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"id": 1, "text": "How do I boil an egg?"}\n')
    run = CliRunner().invoke
    for name, source in (("workdir", ["--workdir", str(ref_dir), "--epoch", "2"]),
                         ("model", ["--model", str(model_dir)])):
        r = run(main, ["score", *source, "--input", str(texts),
                       "--output", str(tmp_path / f"{name}.jsonl")])
        assert r.exit_code == 0, r.output
        r = run(main, ["export", "--to", "hf", *source, "--output", str(tmp_path / f"hf-{name}")])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "workdir.jsonl").read_text() == (tmp_path / "model.jsonl").read_text()
    from safetensors.numpy import load_file

    a = load_file(tmp_path / "hf-workdir" / "model.safetensors")
    b = load_file(tmp_path / "hf-model" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    r = run(main, ["score", "--workdir", str(ref_dir), "--input", str(texts),
                   "--output", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "needs --epoch N" in r.output
    r = run(main, ["export", "--to", "hf", "--workdir", str(ref_dir), "--epoch", "9",
                   "--output", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no checkpoint for epoch 9 (epochs saved: 1, 2, 3)" in r.output
    assert not (tmp_path / "x").exists()


def test_ctrl_c_exits_130_and_says_rerunning_resumes(tmp_path):
    """SIGINT mid-run: one line, no traceback, exit 130; the next run resumes (F6)."""
    import signal
    import subprocess
    import sys

    env = ts.subprocess_env()
    cmd = [sys.executable, "-c", "from limajax.cli import main; main()", "train", "--config",
           str(ts.HERE.parents[1] / "configs" / "tiny.py"), "--workdir", str(tmp_path / "w"),
           "--tokenizer", str(ts.TOKENIZER), "--set", "data.max_len=64", "--peak-flops", "1e12",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # interrupt once epoch 1's checkpoint is written (epoch 2's line)
        lines.append(line)
        if line.startswith("epoch 2/5"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted; rerun the same command to resume" in rest
    assert "Traceback" not in rest and "Aborted" not in rest
    assert [m["step"] for m in workdir.checkpoints(tmp_path / "w")][0] == 6
