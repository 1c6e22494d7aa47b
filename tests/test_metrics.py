"""What a run reports: MFU against the rented accelerator's peak for its compute dtype, null
(with a notice) where the peak is unknown, and strict JSON in every JSONL (review R4)."""

import json
import types

import pytest

from limajax import train, workdir
from limajax.files import json_line


def _devices(kind, n=8, platform="gpu"):
    return [types.SimpleNamespace(device_kind=kind, platform=platform)] * n


@pytest.mark.parametrize("name", list(train.KNOWN_PEAKS))
def test_a_device_gets_its_most_specific_peak(monkeypatch, name):
    """The lookup, not the table's rows: a device_kind that starts with a known name (with or
    without a maker's suffix) gets the longest such name's figure for its compute dtype, times
    the devices; so "H100 PCIe" is never read as an "H100"."""
    for kind in (name, f"{name} 80GB HBM3"):
        monkeypatch.setattr(train.jax, "devices", lambda kind=kind: _devices(kind, n=4))
        best = max((n for n in train.KNOWN_PEAKS if kind.startswith(n)), key=len)
        for dtype in ("bfloat16", "float32"):
            total, source = train.peak_flops(dtype)
            assert total == train.KNOWN_PEAKS[best][dtype] * 4
            assert kind in source and dtype in source


@pytest.mark.parametrize("kind, name", [("NVIDIA H100 80GB HBM3", "NVIDIA H100"),
                                        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
                                        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100")])
def test_real_device_kind_spellings(monkeypatch, kind, name):
    monkeypatch.setattr(train.jax, "devices", lambda: _devices(kind))
    assert train.peak_flops("bfloat16")[0] == 8 * train.KNOWN_PEAKS[name]["bfloat16"]


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
