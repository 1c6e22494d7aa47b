"""Test set-up: 8 simulated CPU devices, set before JAX starts (DESIGN §5)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES} (../shared/fixtures beside the checkout)")
    return FIXTURES


@pytest.fixture(scope="session")
def stories(fixtures, tmp_path_factory) -> Path:
    """stories260K (a real trained model) converted from Meta's layout into `model/` and
    exported for transformers into `hf/`, once per session."""
    from click.testing import CliRunner

    from limajax.cli import main

    root = tmp_path_factory.mktemp("stories")
    src = fixtures / "stories260K"
    result = CliRunner().invoke(main, [
        "convert", "--from", "meta", "--input", str(src / "meta_layout"),
        "--tokenizer", str(src / "tok512.model"), "--output", str(root / "model")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["export", "--to", "hf", "--model", str(root / "model"),
                                       "--output", str(root / "hf")])
    assert result.exit_code == 0, result.output
    return root
