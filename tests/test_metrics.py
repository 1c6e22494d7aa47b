"""What a run reports: MFU against the rented accelerator's peak for its compute dtype, null
(with a notice) where the peak is unknown, and strict JSON in every JSONL (review R4)."""

import json
import types

import pytest

from limajax import train, workdir
from limajax.files import json_line


def _devices(kind, n=8, platform="gpu"):
    return [types.SimpleNamespace(device_kind=kind, platform=platform)] * n


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA H200", "float32", 495e12),
    ("NVIDIA B200", "bfloat16", 2250e12), ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12), ("TPU v6 lite", "bfloat16", 918e12),
])
def test_peak_of_known_accelerators_by_compute_dtype(monkeypatch, kind, dtype, peak):
    monkeypatch.setattr(train.jax, "devices", lambda: _devices(kind))
    total, source = train.peak_flops(dtype)
    assert total == pytest.approx(8 * peak) and kind in source


def test_unknown_accelerator_gives_null_mfu(monkeypatch, tmp_path):
    monkeypatch.setattr(train.jax, "devices", lambda: _devices("NVIDIA L4"))
    assert train.peak_flops("bfloat16") == (None, "unknown for device 'NVIDIA L4'")
    assert train.peak_flops("bfloat16", 0.0)[0] == 0.0  # an explicit figure is taken as given
    path = tmp_path / "metrics.jsonl"
    record = {"step": 1, "loss": 2.0, "mfu": None, "grad_norm": float("nan")}
    workdir.log_metrics(tmp_path, None, record)
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "step": 1, "loss": 2.0, "mfu": None, "grad_norm": None}


def test_json_lines_are_strict():
    line = json_line({"nll": float("nan"), "ppl": [float("inf"), 1.5], "text": "é"})
    assert line == '{"nll": null, "ppl": [null, 1.5], "text": "é"}\n'
