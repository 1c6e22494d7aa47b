"""`limajax train --coordinator ... --num-processes 2 --process-id I`: two processes with 4 CPU
devices each train exactly like one process with 8."""

import socket
import subprocess
import sys

import numpy as np
import train_support as ts
from click.testing import CliRunner

from limajax.cli import main
from limajax.workdir import read_metrics

TINY = str(ts.HERE.parents[1] / "configs" / "tiny.py")
ARGS = ["--config", TINY, "--tokenizer", str(ts.TOKENIZER), "--mesh", "2x4", "--no-progress",
        "--set", "epochs=2", "--set", "data.max_len=128", "--peak-flops", "1e12"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = ts.subprocess_env()
    procs = [subprocess.Popen(
        [sys.executable, "-c", "from limajax.cli import main; main()", "train", *ARGS,
         "--workdir", str(tmp_path / "multi"), "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(pid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for pid in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "epoch 2/2" in outs[0][1] and "epoch 2/2" not in outs[1][1]  # process 0 reports

    r = CliRunner().invoke(main, ["train", *ARGS, "--workdir", str(tmp_path / "single")])
    assert r.exit_code == 0, r.output
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert [m["step"] for m in multi] == list(range(1, 13))  # written once, by process 0
    np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in single],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in multi],
                               [m["grad_norm"] for m in single], rtol=1e-5)
