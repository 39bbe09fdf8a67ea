"""Wall time of ``mutransfer coord-check`` as users run it (a benchmark, not a test).

Runs the command in a subprocess per (configuration, thread count), prints a table and writes
the numbers as JSON. The acceptance figure is the default check (tiny, widths 64..1024, 10 steps,
3 seeds, AdamW, fp32) on a 2-core CPU: it must finish in under 3 minutes.

    python benchmarks/coord_check.py                       # the default check as users run it
    python benchmarks/coord_check.py --threads 0 1 2       # auto, then 1 and 2 threads forced
    python benchmarks/coord_check.py --configs default fp8 muon
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "default": [],
    "compare-sp": ["--compare", "sp"],
    "xmodel": ["--param", "xmodel"],
    "muon": ["--optimizer", "muon"],
    "fp8": ["--precision", "fp8-emulated"],
    "bf16": ["--precision", "bf16"],
}
LIMIT_S = 180.0


def run_one(name: str, threads: int, out: Path) -> dict:
    """One coord-check in a fresh process; its wall time, exit status and verdict."""
    run_dir = out / f"{name}-t{threads}"
    cmd = [sys.executable, "-m", "mutransfer.cli", "coord-check", "tiny", "--out", str(run_dir),
           "--threads", str(threads), *CONFIGS[name]]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    verdict = run_dir / "verdict.json"
    summary = json.loads(verdict.read_text())["summary"] if verdict.exists() else [proc.stderr[-300:]]
    config = run_dir / "config.json"
    used = json.loads(config.read_text())["threads"] if config.exists() else threads
    return {"config": name, "args": CONFIGS[name], "threads": used, "threads_asked": threads,
            "load_avg_before": round(load, 2), "wall_s": round(wall, 1), "exit_status": proc.returncode,
            "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["default"], choices=sorted(CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[0],
                        help="torch threads per run; 0 = the command's default (the cores not already busy)")
    parser.add_argument("--out", default="runs/benchmarks/coord_check", help="run directories and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'config':<12} {'threads':>7} {'load':>5} {'wall s':>8} {'exit':>4}  verdict")
    for name in args.configs:
        for threads in args.threads:
            row = run_one(name, threads, out)
            rows.append(row)
            asked = "auto" if threads == 0 else ""
            print(f"{name:<12} {asked + str(row['threads']):>7} {row['load_avg_before']:>5.1f} {row['wall_s']:>8.1f} "
                  f"{row['exit_status']:>4}  {row['summary'][0]}", flush=True)
    machine = {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__,
               "platform": platform.platform(), "processor": platform.processor()}
    result = {"limit_s": LIMIT_S, "machine": machine, "runs": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} (1-min load average at the end: {machine['load_avg_1min']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
