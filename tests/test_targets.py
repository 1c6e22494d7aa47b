"""`limajax plan --target`: the accelerators' own compilers on compile-only devices (TPU via
libtpu, GPU via XLA's CUDA compiler), and its one-line mistakes. The compiles run where CI
installs the extras (.ci/run); without them those tests skip, saying which extra is missing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from limajax import targets

ROOT = Path(__file__).resolve().parents[1]


def _has(module: str) -> bool:
    return targets._installed(module)


needs_tpu = pytest.mark.skipif(not _has("libtpu"), reason='needs pip install "limajax[tpu]"')
needs_cuda = pytest.mark.skipif(not _has("jax_plugins.xla_cuda12"),
                                reason='needs pip install "limajax[cuda-plan]"')


def _plan(*args, timeout=600):
    """`limajax plan` in a fresh process with no JAX_PLATFORMS of its own: the CLI's rule (CPU
    unless an accelerator's device node exists) is what keeps libtpu and CUDA quiet."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", "from limajax.cli import main; main()", "plan", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _gib(text: str, label: str) -> list[float]:
    line = next(x for x in text.splitlines() if x.strip().startswith(label))
    return [float(v.replace(",", "")) for v in re.findall(r"([\d,.]+) GiB", line)]


TINY = ROOT / "configs" / "tiny.py"


def test_list_targets(cli):
    r = cli("plan", "--list-targets")
    assert r.exit_code == 0, r.output
    for name in ("v5e-8", "v5p-16", "v5p-128", "v6e-8", "h100x8", "h200x8", "a100-80gbx8",
                 "b200x8", "2xh200x8"):
        assert re.search(rf"^{re.escape(name)}\s", r.output, re.M), name
    h200 = next(x for x in r.output.splitlines() if x.startswith("h200x8"))
    assert "140.4 GiB" in h200 and "gpu_specs/h200.txtpb" in h200
    assert targets.TARGETS["v5p-16"].devices == 8 and targets.TARGETS["2xh200x8"].devices == 16
    assert targets.TARGETS["h200x8"].usable / 2**30 == pytest.approx(124.96, abs=0.01)


def test_unknown_target_lists_the_known_ones(cli):
    r = cli("plan", "--config", TINY, "--target", "h300x8")
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "unknown; known: v5e-8" in r.stderr and "h200x8" in r.stderr


def test_a_mesh_of_another_size_than_the_target_is_one_line(cli):
    r = cli("plan", "--config", TINY, "--target", "v5e-16", "--mesh", "2x4")
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: --mesh 2x4 has 8 devices; --target v5e-16 has 16 "
                                "(try --mesh 1x16 or 2x8 or 4x4 or 8x2, ...)")


@pytest.mark.parametrize("target, extra", [("v5e-8", "tpu"), ("h200x8", "cuda-plan")])
def test_a_missing_extra_names_it(cli, monkeypatch, target, extra):
    monkeypatch.setattr(targets, "_installed", lambda module: False)
    r = cli("plan", "--config", TINY, "--target", target)
    assert r.exit_code == 2
    assert r.stderr.strip().endswith(f'pip install "limajax[{extra}]"'), r.stderr
    assert r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("value", ["-5", "0"])
def test_seq_len_must_be_positive(cli, value):
    r = cli("plan", "--config", TINY, "--seq-len", value)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"Invalid value for '--seq-len': {value} is not in the range x>=1" in r.output


def test_remat_auto_takes_the_cheapest_policy_that_fits(cli):
    """tiny on 2x4 at batch 8 x 512: no remat needs the most memory (0.14 GiB), dots 0.04,
    full 0.03; at a limit between none and dots, auto passes over none, says why, takes dots."""
    none = cli("plan", "--config", TINY, "--set", "model.remat=none", "--device-memory", "1GiB")
    full = cli("plan", "--config", TINY, "--set", "model.remat=full", "--device-memory", "1GiB")
    need_none, need_full = (_gib(r.stdout, "total")[0] * 2**30 for r in (none, full))
    assert need_full < need_none
    limit = int((need_none + need_full) / 2)
    r = cli("plan", "--config", TINY, "--set", "model.remat=auto", "--device-memory",
            f"{limit}B")
    assert r.exit_code == 0, r.output
    assert re.search(r"remat auto: none does not fit \((arithmetic|compiled): [\d.]+ GiB",
                     r.stdout), r.stdout
    assert re.search(r"remat (\w+), attention", r.stdout).group(1) == "dots"


@needs_tpu
def test_tiny_compiles_for_a_tpu_slice_with_splash():
    """The tiny recipe's step (bfloat16, attention auto -> splash, natively: not the Pallas
    interpreter) by libtpu's compiler for a v5e 2x4 slice, with its cost model's estimates."""
    proc = _plan("--config", TINY, "--target", "v5e-8", "--set", "model.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention: splash (auto on tpu)" in proc.stderr
    assert "libtpu" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    out = proc.stdout
    assert "by the tpu compiler" in out and "target v5e-8: 8 devices" in out
    assert re.search(r"estimates \(the tpu compiler's cost model, not a measurement\): step "
                     r"[\d.e-]+ s, [\d,]+ tokens/s", out), out
    assert _gib(out, "total")[0] < 16


@needs_cuda
def test_cudnn_compiles_for_h200_with_kv_heads_fewer_than_the_model_axis():
    """tiny has 4 K/V heads for 8 query heads; on 1x8 cuDNN would see Q split and K/V
    replicated ("Query, key and value should have same sharding"): each K/V head is repeated
    for its query heads, said in one line, and XLA's GPU compiler compiles it."""
    proc = _plan("--config", TINY, "--target", "h200x8", "--mesh", "1x8", "--set",
                 "model.dtype=bfloat16", "--set", "model.attention=cudnn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("attention: cudnn (model.attention on gpu); its 4 K/V heads do not divide the "
            "model axis (8) and cuDNN needs Q, K and V sharded alike, so each is repeated for "
            "its 2 query heads") in proc.stderr
    assert "Traceback" not in proc.stderr and "cuInit" not in proc.stderr
    out = proc.stdout
    assert "by the cuda compiler" in out and "fits" in out
    assert "estimates: none (the gpu compiler gives no cost model here)" in out


@needs_cuda
def test_lima_65b_fits_one_8x_h200_node():
    """configs/lima_65b_h200.py as XLA's GPU compiler plans it: within the 125 GiB per device
    JAX may take of an H200 (141 GB less the runtime's reserve), float32 master weights; the
    temporaries hold one float32 gradient tree (30.4 GiB), not the sum and a micro batch's own
    (63.75 GiB at micro batch 1 when they did), plus activations."""
    proc = _plan("--config", ROOT / "configs" / "lima_65b_h200.py", "--target", "h200x8")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    out = proc.stdout
    assert "65.29B parameters, mesh 1x8 (8 devices), global batch 32 x 2048" in out
    assert "params float32, compute bfloat16, moments bfloat16, remat full" in out
    params, _ = _gib(out, "parameters")
    assert params == pytest.approx(65.36e9 * 4 / 8 / 2**30, rel=0.01)  # float32 masters
    total = _gib(out, "total")[0]
    assert total <= 125 and "device memory 124.96 GiB usable: fits" in out
    assert "(micro batch 4)" in out and _gib(out, "temporaries")[0] < 1.5 * params


@needs_tpu
def test_a_program_past_the_tpu_hbm_is_does_not_fit_not_a_traceback():
    """libtpu's compiler refuses a program past the chip's HBM (RESOURCE_EXHAUSTED, naming its
    temporaries): plan reports that as its answer, exit 3 (the one-node 65B recipe on 8 v5p
    chips of 95 GiB)."""
    proc = _plan("--config", ROOT / "configs" / "lima_65b_h200.py", "--target", "v5p-16",
                 "--set", "model.remat=full")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "device memory 95.00 GiB usable: DOES NOT FIT" in proc.stdout
    assert _gib(proc.stdout, "temporaries")[0] > 95


@needs_tpu
def test_two_processes_get_tpu_devices_at_once():
    """libtpu locks /tmp/libtpu_lockfile for the process that drives the chips; compile-only
    devices open none, so a plan beside another libtpu process (a second plan, CI's tests) must
    not fail with "Internal error when accessing libtpu multi-process lockfile"."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "os.environ.update(TPU_SKIP_MDS_QUERY='1', TPU_WORKER_HOSTNAMES='localhost')\n"
         "from jax.experimental import topologies\n"
         "topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x4')\n"
         "print('holding', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "holding"
        proc = subprocess.run(
            [sys.executable, "-c", "from limajax import targets\n"
             "print(len(targets.compile_only_devices(targets.TARGETS['v5e-8'])))"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0 and proc.stdout.strip() == "8", proc.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()


@needs_tpu
def test_sample_plan_by_the_tpu_compiler_with_estimates():
    """`plan --sample` with --target: the sampler's prefill and decode step compiled by
    libtpu for a v5e 2x4 slice, with its cost model's prefill time and decode tokens/s."""
    proc = _plan("--config", TINY, "--target", "v5e-8", "--sample", "8x512", "--set",
                 "model.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8 rows x 512 tokens (cache 512 slots" in out and "by the tpu compiler" in out
    assert re.search(r"estimates \(the tpu compiler's cost model, not a measurement\): prefill "
                     r"of 8 x 512 tokens [\d.e-]+ s; decode step [\d.e-]+ ms over the full "
                     r"cache, [\d,]+ tokens/s", out), out
