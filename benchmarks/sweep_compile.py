"""Does torch.compile pay for a sweep trial? Trials per minute with ``train.compile`` off and on.

Runs the same small sweep twice (each in a fresh directory, one worker, the same sampler seed):
once eager, once with every block compiled (``[train] compile = true``), and prints trials/min,
seconds per trial and the speed-up. A short trial spends most of its time compiling; a long one
amortises it -- ``--steps`` moves the trial's length to find where compiling starts to pay.

    python benchmarks/sweep_compile.py                         # the quickstart sweep, 4 trials
    python benchmarks/sweep_compile.py --steps 120 480 --trials 3 --json runs/benchmarks/sweep_compile.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(sweep: Path, out: Path, trials: int, steps: int, compile_: bool, threads: int) -> dict:
    cmd = [sys.executable, "-m", "mutransfer.cli", "sweep", str(sweep), "--out", str(out), "--quiet",
           "--trials", str(trials), "--threads", str(threads), "--set", f"train.steps={steps}",
           "--set", f"train.eval_every={steps}", "--set", "objective.last_evals=1", "--set", "pruner.kind='none'",
           "--set", f"train.compile={'true' if compile_ else 'false'}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return {"compile": compile_, "steps": steps, "trials": trials, "seconds": seconds, "returncode": done.returncode,
            "trials_per_min": 60 * trials / seconds, "seconds_per_trial": seconds / trials,
            "best": (summary.get("best") or {}).get("value")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", default=str(ROOT / "proxy_sweeps" / "quickstart.toml"))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[120], help="trial lengths to measure")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            for compile_ in (False, True):
                out = Path(tmp) / f"{steps}-{compile_}"
                rows.append(run(Path(args.sweep), out, args.trials, steps, compile_, args.threads))
                r = rows[-1]
                print(f"steps {steps:>5} compile {str(compile_):<5} {r['trials_per_min']:6.2f} trials/min "
                      f"({r['seconds_per_trial']:.1f} s a trial, rc {r['returncode']})", flush=True)
    for steps in args.steps:
        eager, compiled = (next(r for r in rows if r["steps"] == steps and r["compile"] == c) for c in (False, True))
        print(f"steps {steps}: compile pays x{compiled['trials_per_min'] / eager['trials_per_min']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
