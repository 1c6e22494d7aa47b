"""Two processes with 4 CPU devices each train exactly like one process with 8."""

import json
import socket

import numpy as np
import train_support as ts

from limajax import sharding, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env_procs = []
    for pid in (0, 1):
        env_procs.append(ts.start_script(tmp_path / "multi", "2x4", 4, f"processes=2,{pid},{port}",
                                         "epochs=2", "rows=32"))
    outs = [p.communicate(timeout=240) for p in env_procs]
    for p, (_, err) in zip(env_procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    multi = json.loads((tmp_path / "multi" / "out.run.json").read_text())

    config = ts.tiny_config(epochs=2)
    single = train.run(config, tmp_path / "single", ts.Loader(config, ts.rows(32)),
                       mesh=sharding.make_mesh("2x4"), progress=False, peak=1e12)
    assert [m["step"] for m in multi] == list(range(1, 9))
    np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in single],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in multi],
                               [m["grad_norm"] for m in single], rtol=1e-5)
    # Only process 0 wrote the metrics.
    assert len((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()) == 8
