"""Per-device memory of the LIMA recipes by four estimates: the CPU compiler (the stand-in
`limajax plan` uses without --target), plan's arithmetic, libtpu's compiler for a v5p slice and
XLA's GPU compiler for 8x H200, with each compile's time. Each plan runs as its own `limajax
plan` process (a compiler's devices are set up once per process). Needs the tpu and cuda extras
for those columns (CI's environment, or a venv: README "plan"); remat is pinned to full so the
columns compare one program. Prints a Markdown table for the README.

    python tools/bench_plan.py [--cases 7b,65b-8x8,65b-1x8] [--compilers cpu,tpu,gpu]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# case -> (recipe, mesh, {compiler: target or None for the CPU stand-in}, --set overrides)
CASES = {
    "7b": ("lima_7b.py", "2x4", {"cpu": None, "tpu": "v5p-16", "gpu": "h200x8"}, []),
    "65b-8x8": ("lima_65b.py", "8x8", {"cpu": None, "tpu": "v5p-128"}, []),
    "65b-1x8": ("lima_65b_h200.py", "1x8", {"cpu": None, "tpu": "v5p-16", "gpu": "h200x8"}, []),
}


def run(recipe: str, mesh: str, target: str | None, overrides: list[str]) -> dict:
    args = [sys.executable, "-c", "from limajax.cli import main; main()", "plan", "--config",
            str(ROOT / "configs" / recipe), "--mesh", mesh, "--set", "model.remat=full"]
    args += ["--device-memory", "1TiB"] if target is None else ["--target", target]
    for item in overrides:
        args += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    total = re.search(r"^\s+total\s+([\d,.]+) GiB\s+([\d,.]+) GiB", proc.stdout, re.M)
    if proc.returncode not in (0, 3) or total is None:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall": wall}
    compiled = re.search(r"compiled in ([\d.]+) s", proc.stdout)
    return {"total": float(total.group(1).replace(",", "")),
            "analytic": float(total.group(2).replace(",", "")),
            "compile": float(compiled.group(1)), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="which of " + ", ".join(CASES))
    parser.add_argument("--compilers", default="cpu,tpu,gpu", help="cpu, tpu, gpu")
    args = parser.parse_args()
    wanted = args.compilers.split(",")
    rows = ["| recipe, mesh | arithmetic | CPU compiler (stand-in) | TPU compiler (v5p) | "
            "GPU compiler (H200) |", "|---|---|---|---|---|"]
    for case in args.cases.split(","):
        recipe, mesh, compilers, overrides = CASES[case]
        cells, analytic = {}, None
        for name in ("cpu", "tpu", "gpu"):
            if name not in compilers or name not in wanted:
                cells[name] = "not run" if name in compilers else "no such target"
                continue
            r = run(recipe, mesh, compilers[name], overrides)
            print(case, name, r, file=sys.stderr, flush=True)
            if "error" in r:
                cells[name] = f"failed: {r['error'][:80]}"
                continue
            analytic = r["analytic"]
            where = "" if compilers[name] is None else f"{compilers[name]}, "
            cells[name] = f"{r['total']:.2f} GiB ({where}{r['compile']:.0f} s)"
        rows.append(f"| {recipe} {mesh} | "
                    f"{'' if analytic is None else f'{analytic:.2f} GiB'} | {cells['cpu']} | "
                    f"{cells['tpu']} | {cells['gpu']} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
