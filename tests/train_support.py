"""Shared pieces of the training tests: a tiny run on real tokenizer ids, and a script entry
point so runs on other device counts (and runs killed on purpose) happen in subprocesses.

    python tests/train_support.py WORKDIR MESH DEVICES [kill=E.I [wait=STEP]] [epochs=N] [rows=N]
                                  [processes=P,ID,PORT] [tag=NAME]
    python tests/train_support.py - MESH DEVICES three_steps OUT.npz
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TOKENIZER = FIXTURES / "stories260K" / "tok512.model"
HERE = Path(__file__).resolve()
# Runs here compile the same few programs again and again (in both pytest-xdist workers and in
# subprocesses): a persistent compilation cache turns the repeats into disk reads. A size limit
# makes JAX read and write its entries under a file lock; without one it writes them in place,
# and a process running beside the writer could read an entry half-written.
JAX_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "limajax-test-jax-cache"
# JAX's options for it, set here by jax.config and in subprocesses by their environment
# variables (each option's name upper-cased).
JAX_CACHE_OPTIONS = {"jax_compilation_cache_dir": str(JAX_CACHE),
                     "jax_compilation_cache_max_size": 2**32,  # the size limit: the lock
                     "jax_persistent_cache_min_compile_time_secs": 0,
                     "jax_persistent_cache_min_entry_size_bytes": 0}
# The suite compiles hundreds of small programs whose run time is negligible: LLVM's cheap
# codegen takes a quarter to a third off compiling them (measured on test_train.py, 2026-12-04).
# The HLO is the program users run; floats may differ from the default codegen in the last
# bits (stories260K's logits by 1e-5 at most), far inside every tolerance here.
CHEAP_CODEGEN = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for the tests and their subprocesses: cheap codegen, and `devices` simulated
    CPU devices (None: as many as the command's --mesh asks for)."""
    count = "" if devices is None else f" --xla_force_host_platform_device_count={devices}"
    return CHEAP_CODEGEN + count


def subprocess_env(devices: int | None = None, **extra: str) -> dict:
    """A test subprocess's environment: the CPU, xla_flags(devices) and the session's
    compilation cache (programs compiled before are disk reads)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices),
            **{name.upper(): str(value) for name, value in JAX_CACHE_OPTIONS.items()}, **extra}


def use_compilation_cache():
    import jax

    for name, value in JAX_CACHE_OPTIONS.items():
        jax.config.update(name, value)


use_compilation_cache()

# Eight short dialogues (user, assistant): small enough to memorise, real SentencePiece ids.
DIALOGUES = [
    ["What colour is the sky?", "The sky is blue on a clear day."],
    ["Name a big animal.", "An elephant is a very big animal."],
    ["Where do fish live?", "Fish live in rivers, lakes and the sea."],
    ["What do cats say?", "Cats say meow when they want food."],
    ["Tell me a fruit.", "A red apple is a sweet fruit."],
    ["When do we sleep?", "We sleep at night when it is dark."],
    ["What is snow?", "Snow is cold white ice that falls in winter."],
    ["Who was Lily?", "Lily was a little girl who loved to play."],
]


def tokenizer():
    from limajax.tokenizer import Tokenizer

    return Tokenizer.from_path(TOKENIZER)


def tiny_config(**changes):
    """Two layers of the tiny preset, batch 8 of at most 80 tokens (packed two dialogues
    a row), 3 epochs of 2 steps."""
    from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

    model = preset("tiny").replace(n_layers=2, vocab_size=tokenizer().vocab_size,
                                   n_kv_heads=8)
    base = dict(model=model, data=DataConfig(batch_size=8, max_len=80), epochs=3, dropout=0.2,
                optim=OptimConfig(lr=1e-3, end_lr=1e-4, eps=1e-4), mesh="2x4")
    # eps 1e-4, not 1e-8: Adam's first update is about lr * sign(g), so for gradient entries
    # near 0 a different summation order (another mesh, accumulation) would flip whole
    # updates; with eps above that rounding noise, equal gradients mean equal parameters.
    base.update(changes)
    return TrainConfig(**base)


def rows(n: int = 16) -> list[dict]:
    """n dialogues: the eight above, repeated with a varying second turn."""
    return [{"conversations": [d[0], d[1] + " " * (i // 8)]}
            for i, d in zip(range(n), DIALOGUES * (n // 8 + 1), strict=False)]


class KillableLoader:
    """data.Batches, optionally killing this process (SIGKILL) when asked for one batch."""

    def __init__(self, config, source, kill_at: tuple[int, int] | None = None,
                 kill_after: Path | None = None):
        from limajax import data, sharding

        d = config.data
        data_axis, _ = sharding.parse_mesh(config.mesh)
        self.inner = data.Batches(source, tokenizer(), batch_size=d.batch_size, seed=d.seed,
                                  max_len=d.max_len, buckets=(d.max_len,), pack=d.pack,
                                  row_multiple=data_axis * d.accumulation_steps,
                                  num_epochs=config.epochs, read_options=None)
        self.steps_per_epoch, self.kill_at = self.inner.steps_per_epoch, kill_at
        self.kill_after = kill_after  # a checkpoint directory to wait for before the kill

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def __iter__(self):
        it = iter(self.inner)
        while True:
            s = self.inner.get_state()
            if self.kill_at == (s["epoch"], s["index"]):
                for _ in range(600):
                    if self.kill_after is None or self.kill_after.is_dir():
                        break
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                yield next(it)
            except StopIteration:
                return


def params_numpy(state) -> dict:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
            for k, v in jax.tree_util.tree_leaves_with_path(state.params)}


def _script(workdir, mesh: str, devices: int, args) -> tuple[list[str], dict]:
    return [sys.executable, str(HERE), str(workdir), mesh, str(devices), *args], \
        subprocess_env(devices)


def run_script(workdir, mesh: str, devices: int, *args: str, timeout: int = 120):
    """Run this file in a subprocess with `devices` simulated CPU devices."""
    cmd, env = _script(workdir, mesh, devices, args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def start_script(workdir, mesh: str, devices: int, *args: str) -> subprocess.Popen:
    """Like run_script, without waiting (for several processes of one run)."""
    cmd, env = _script(workdir, mesh, devices, args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def three_steps(config, mesh):
    """Losses and final parameters of three steps on `mesh` (no workdir)."""
    from limajax import sharding, train
    from limajax.config import apply_overrides

    shape = f"{mesh.shape['data']}x{mesh.shape['model']}"  # the rows' multiple follows the mesh
    config = apply_overrides(config, ["epochs=1", f"mesh={shape}"])
    setup = train.build(config, mesh, steps_per_epoch=3)
    state = train.init_state(setup)
    step = train.make_train_step(setup)
    losses = []
    for batch in list(KillableLoader(config, rows(24)))[:3]:
        with sharding.activate(mesh):
            state, m = step(state, train.put_batch(batch, setup))
        losses.append(float(m["loss"]))
    return losses, params_numpy(state)


def main(argv):
    workdir, mesh, _devices, *rest = argv
    if rest and rest[0] == "three_steps":
        from limajax import sharding

        losses, params = three_steps(tiny_config(), sharding.make_mesh(mesh))
        np.savez(rest[1], __losses__=np.asarray(losses), **params)
        return
    opts = dict(a.split("=", 1) for a in rest)
    if "processes" in opts:
        import jax

        n, pid, port = opts["processes"].split(",")
        jax.distributed.initialize(f"127.0.0.1:{port}", int(n), int(pid))
    from limajax import train

    changes = {"mesh": mesh}
    if "epochs" in opts:
        changes["epochs"] = int(opts["epochs"])
    config = tiny_config(**changes)
    kill = tuple(int(x) for x in opts["kill"].split(".")) if "kill" in opts else None
    after = Path(workdir) / "checkpoints" / opts["wait"] if "wait" in opts else None
    loader = KillableLoader(config, rows(int(opts.get("rows", 16))), kill, after)
    metrics = train.train(config, workdir, loader, progress=False, peak=1e12)
    out = Path(workdir) / f"out.{opts.get('tag', 'run')}"
    import jax

    if jax.process_count() == 1:
        state = _final_state(config, workdir, loader.steps_per_epoch)
        np.savez(str(out) + ".npz", **params_numpy(state))
    if jax.process_index() == 0:
        Path(str(out) + ".json").write_text(json.dumps(metrics))


def _final_state(config, workdir, steps_per_epoch):
    """The latest checkpoint, restored onto one device."""
    from limajax import sharding, train
    from limajax.workdir import checkpoint_manager, restore_state

    mesh = sharding.single_device_mesh()
    setup = train.build(config, mesh, steps_per_epoch)
    manager = checkpoint_manager(workdir)
    state, _ = restore_state(manager, manager.latest_step(), setup.abstract_state)
    manager.close()
    return state


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    main(sys.argv[1:])
