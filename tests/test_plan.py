"""`limajax plan`: the real train step compiled ahead of time for LLaMA-65B on 8x8."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gib(text: str, label: str) -> list[float]:
    line = next(x for x in text.splitlines() if x.strip().startswith(label))
    return [float(v.replace(",", "")) for v in re.findall(r"([\d,.]+) GiB", line)]


def _plan(*args):
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", "from limajax.cli import main; main()", "plan", "--config",
         str(ROOT / "configs" / "lima_65b.py"), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def plan_65b():
    # remat pinned to the recipe's choice (auto compiles dots first, then full: twice the time)
    return _plan("--mesh", "8x8", "--device-memory", "32GiB", "--set", "model.remat=full")


def test_lima_65b_fits_32gib_on_8x8(plan_65b):
    out = plan_65b.stdout
    assert plan_65b.returncode == 0, plan_65b.stderr[-2000:] + out
    assert "65.29B parameters, mesh 8x8 (64 devices), global batch 32 x 2048 tokens" in out
    assert "fits" in out and "DOES NOT FIT" not in out
    assert "by the CPU compiler, a stand-in for the accelerator's" in out
    # Consistency with the analytic estimate: fp32 master weights and AdamW's two fp32 moments
    # are 4 + 8 bytes per parameter over 64 devices (65.29B + vocabulary padding).
    params, params_est = _gib(out, "parameters")
    opt, opt_est = _gib(out, "optimizer state")
    assert params == pytest.approx(65.36e9 * 4 / 64 / 2**30, rel=0.01)
    assert params_est == pytest.approx(params, rel=0.01) and opt == pytest.approx(2 * params,
                                                                                 rel=0.01)
    assert opt_est == pytest.approx(opt, rel=0.01)
    total, total_est = _gib(out, "total")
    assert 20 < total <= 32
    # The compiler's temporaries vs arithmetic: within 5% once AdamW's whole float32 update
    # (one parameter-sized tree, 3.8 GiB here) is counted.
    temp, temp_est = _gib(out, "temporaries")
    assert _gib(out, "of which: AdamW update")[0] == pytest.approx(params, rel=0.01)
    assert temp == pytest.approx(temp_est, rel=0.05)
    assert total == pytest.approx(total_est, rel=0.05)


def test_plan_exits_3_when_it_does_not_fit():
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", "from limajax.cli import main; main()", "plan", "--config",
         str(ROOT / "configs" / "tiny.py"), "--device-memory", "1MiB"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]  # its own code: 1 is an internal error
    assert "DOES NOT FIT" in proc.stdout


def test_device_memory_needs_a_unit():
    from limajax.errors import UserError
    from limajax.plan import parse_bytes

    assert parse_bytes("32GiB") == 32 * 2**30 and parse_bytes("16GB") == 16 * 10**9
    with pytest.raises(UserError, match="expected a size with its unit"):
        parse_bytes("32")


def test_replicated_tensors_are_named_with_their_cost(cli):
    """K/V heads fewer than the model axis are replicated (as is standard), never silently:
    `plan` (and `train`, `score`) name each such tensor and its cost per device (R3)."""
    r = cli("plan", "--config", ROOT / "configs" / "tiny.py", "--mesh", "1x8",
            "--device-memory", "1GiB")
    assert r.exit_code == 0, r.output
    notices = [x for x in r.stderr.splitlines() if "replicated" in x]
    # wk and wv: [5 layers, 64, 4 K/V heads, 8] float32 = 40 KiB, 7/8 of it extra per device;
    # the feed-forward's 172 (Meta's rule with multiple_of 4) does not split 8 ways either.
    assert [x.split(" [")[0] for x in notices] == [
        "notice: layers.attention.wk.kernel", "notice: layers.attention.wv.kernel",
        "notice: layers.feed_forward.w1.kernel", "notice: layers.feed_forward.w2.kernel",
        "notice: layers.feed_forward.w3.kernel"]
    assert all("kv_heads (4) over model (8) does not divide" in x and "+0.03 MiB per device" in x
               for x in notices[:2]), notices
    assert "mlp (172) over model (8)" in notices[2]


def test_sample_plan_compiles_prefill_and_decode_with_the_kv_cache():
    """`plan --sample`: the sampler's prefill and one decode step compiled on the inference
    mesh. The KV cache is what it must be, 2 x layers x rows x slots x K/V heads x head_dim x
    dtype size per shard (rows over data, K/V heads over model), the decode step updates the
    donated state in place, and the rows and the context are rounded as `sample` rounds them."""
    from limajax import plan
    from limajax.config import load_recipe

    config = load_recipe(ROOT / "configs" / "tiny.py", [
        "model.dim=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4",
        "model.dtype=bfloat16", "model.param_dtype=bfloat16"], mesh="2x4")
    r = plan.plan_sample(config, 5, 1000, plan.parse_bytes("1GiB"))
    assert (r.batch, r.cache_length) == (6, 1024)  # whole rows over data 2; the 1024 bucket
    assert r.cache == 2 * 4 * (6 // 2) * 1024 * (4 // 4) * 64 * 2
    m = config.model
    assert r.params == pytest.approx(m.n_params * 2 / 8, rel=0.02)  # bf16, every weight split 8
    assert r.decode.arguments >= r.params + r.cache + r.state
    assert r.decode.aliased >= r.cache + r.state  # the donated state, written in place
    assert r.prefill.outputs >= r.cache
    assert r.fits and r.total == max(r.prefill.total, r.decode.total)
    out = r.format()
    assert "6 rows x 1000 tokens (cache 1024 slots" in out and "mesh 2x4 (8 devices)" in out
    assert _gib(out, "KV cache") == [round(r.cache / 2**30, 2)] * 2
    assert _gib(out, "total") == [round(r.prefill.total / 2**30, 2),
                                  round(r.decode.total / 2**30, 2)]
    assert "by the CPU compiler, a stand-in" in out
    assert not plan.plan_sample(config, 5, 1000, 2 * 2**20).fits  # 2 MiB: exit 3 in the cli


def test_a_decode_step_holds_one_kv_cache():
    """The decode step writes each layer's slots back into the (donated) cache it carries, so it
    holds no second cache: its temporaries are one layer's work, below the cache (here 34 MB
    against 67 MB; 198 MB when the layer scan took the cache in and gave a new one out)."""
    from limajax import plan
    from limajax.config import load_recipe

    config = load_recipe(ROOT / "configs" / "tiny.py", [
        "model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4",
        "model.dtype=bfloat16", "model.param_dtype=bfloat16"], mesh="2x4")
    r = plan.plan_sample(config, 32, 2048, 2**30)
    assert r.cache == 2 * 8 * 16 * 2048 * 1 * 64 * 2
    assert r.decode.temp < r.cache, (r.decode.temp, r.cache)


def test_sample_shape_and_context_are_checked():
    from limajax import plan
    from limajax.config import load_recipe
    from limajax.errors import UserError

    assert plan.parse_sample("8x2048") == (8, 2048)
    for bad in ("8", "8x", "0x512", "8x2048x2", "ax512"):
        with pytest.raises(UserError, match="expected BATCHxCONTEXT"):
            plan.parse_sample(bad)
    config = load_recipe(ROOT / "configs" / "tiny.py", [], mesh="2x4")
    with pytest.raises(UserError, match="this model's context is 2048 tokens"):
        plan.plan_sample(config, 8, 4096, 2**30)


def test_plan_sample_in_the_cli(cli):
    """The cli's --sample: the sampler's report, exit 3 when it does not fit, and its mistakes
    as one line each."""
    tiny = ROOT / "configs" / "tiny.py"
    r = cli("plan", "--config", tiny, "--sample", "8x512", "--device-memory", "1GiB")
    assert r.exit_code == 0, r.output
    assert "plan --sample:" in r.stdout and "8 rows x 512 tokens" in r.stdout
    assert cli("plan", "--config", tiny, "--sample", "8x512", "--device-memory",
               "1MiB").exit_code == 3
    for args, message in ((("--sample", "8"), "expected BATCHxCONTEXT"),
                          (("--sample", "8x512", "--seq-len", "64"), "--seq-len is the train")):
        r = cli("plan", "--config", tiny, *args)
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert r.stderr.strip().count("\n") == 0, r.stderr
