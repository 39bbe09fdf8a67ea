"""Wall time of ``mutransfer coord-check``, as users run it and side by side with microsoft mup's
``get_coord_data`` (a benchmark, not a test).

As users run it (default): the command in a subprocess per (configuration, thread count), with its
files; the acceptance figure is the default check (tiny, widths 64..1024, 10 steps, 3 seeds,
AdamW, fp32) on a 2-core CPU: it must finish in under 3 minutes.

Side by side (``--vs-mup``): one process, one thread count, the default check's models, widths,
steps, seeds, batch and LR, recorded three ways, alternating over ``--repeats`` rounds (the order
reversed every other round), the best round of each counting:

- ``ours``: ``mutransfer.coord.run_coord_check`` -- what the command computes, without the files:
  l1 and rms of every tapped output, the attention logits, and dW x of every linear layer.
- ``mup``: ``mup.coord_check.get_coord_data`` on the same ``build_model`` at each width, the same
  fixed batch, ``optimizer="adamw"``, ``mup=False`` (so ``torch.optim.AdamW(model.parameters(),
  lr)``: one group, torch's default implementation), ``nsteps``, ``nseeds``: l1 of every module's
  output. How tests/test_coord_check.py drives it.
- ``mup-our-opt``: the same recorder (``mup.coord_check._get_coord_data``, which ``get_coord_data``
  wraps) training with our optimizer (``build_optimizers``: one AdamW group per muP role, fused
  kernel), so that only the recorders differ.

    python benchmarks/coord_check.py                       # the default check as users run it
    python benchmarks/coord_check.py --threads 0 1 2       # auto, then 1 and 2 threads forced
    python benchmarks/coord_check.py --configs default fp8 muon
    python benchmarks/coord_check.py --vs-mup --threads 1  # against mup's get_coord_data
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
RECORDERS = ("ours", "mup", "mup-our-opt")


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


# ---------------------------------------------------------------- side by side with mup


def vs_mup(threads: int, repeats: int, recorders: list[str]) -> dict:
    """The default check recorded by each of ``recorders``, interleaved; wall seconds per round."""
    from mup.coord_check import _get_coord_data, get_coord_data

    from mutransfer.build import build_model
    from mutransfer.coord import fixed_batches, run_coord_check
    from mutransfer.coord_config import CoordConfig
    from mutransfer.data.builtin import builtin_dataset
    from mutransfer.optim import build_optimizers
    from mutransfer.transformer_spec import transformer_spec

    if threads:
        torch.set_num_threads(threads)
    cfg = CoordConfig().resolved()
    dataset = builtin_dataset(tokenizer="byte")
    x, y = fixed_batches(cfg, dataset)[0]
    hp = cfg.hparams()
    shapes = {s.model.d_model: s for s in cfg.shapes()}
    models = {w: (lambda s=s: build_model(s, hp, seed=None)) for w, s in shapes.items()}  # mup seeds the RNG
    mup_args = {"nsteps": cfg.steps, "nseeds": cfg.seeds, "flatten_output": True, "fix_data": True, "cuda": False,
                "show_progress": False}

    def ours():
        return len(run_coord_check(cfg, dataset))

    def mup():
        return len(get_coord_data(models, [(x, y.flatten())], optimizer="adamw", lr=cfg.lr, mup=False, **mup_args))

    def mup_our_opt():
        def optcls(model):
            shape = shapes[model.cfg.d_model]
            return build_optimizers(model, transformer_spec(shape.model), shape.model, shape.param, hp, cfg.optimizer)
        return len(_get_coord_data(models, [(x, y.flatten())], optcls, **mup_args))

    run = {"ours": ours, "mup": mup, "mup-our-opt": mup_our_opt}
    rounds: dict[str, list[dict]] = {r: [] for r in recorders}
    for i in range(repeats):
        for name in (recorders if i % 2 == 0 else recorders[::-1]):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            rows = run[name]()
            rounds[name].append({"wall_s": round(time.perf_counter() - start, 2), "records": rows,
                                 "load_avg_before": round(load, 2)})
            print(f"  round {i + 1} {name:<12} {rounds[name][-1]['wall_s']:>7.1f} s  {rows} records  "
                  f"load {load:.1f}", flush=True)
    best = {name: min(r["wall_s"] for r in rs) for name, rs in rounds.items()}
    check = {"preset": cfg.preset, "widths": cfg.widths, "steps": cfg.steps, "seeds": cfg.seeds, "lr": cfg.lr,
             "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "optimizer": cfg.optimizer, "param": cfg.param}
    ratios = {f"ours/{name}": round(best["ours"] / best[name], 3) for name in best if name != "ours" and "ours" in best}
    return {"check": check, "threads": torch.get_num_threads(), "repeats": repeats, "rounds": rounds,
            "best_wall_s": best, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["default"], choices=sorted(CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[0],
                        help="torch threads per run; 0 = the command's default (the cores not already busy)")
    parser.add_argument("--vs-mup", action="store_true",
                        help="the default check side by side with mup's get_coord_data, in this process")
    parser.add_argument("--recorders", nargs="+", default=list(RECORDERS), choices=RECORDERS,
                        help="with --vs-mup: which recorders to run")
    parser.add_argument("--repeats", type=int, default=2, help="with --vs-mup: rounds; the best counts")
    parser.add_argument("--out", default="runs/benchmarks/coord_check", help="run directories and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "torch": torch.__version__,
               "platform": platform.platform(), "processor": platform.processor()}
    if args.vs_mup:
        threads = args.threads[0]
        print(f"default coord check vs mup's get_coord_data, threads {threads or 'torch default'}, "
              f"{args.repeats} rounds", flush=True)
        result = vs_mup(threads, args.repeats, args.recorders)
        machine["load_avg_end"] = os.getloadavg()
        print(f"{'recorder':<12} {'best s':>7}  rounds")
        for name, rs in result["rounds"].items():
            print(f"{name:<12} {result['best_wall_s'][name]:>7.1f}  {[r['wall_s'] for r in rs]}")
        for name, ratio in result["ratios"].items():
            print(f"{name}: {ratio:.3f}")
        path = out / "vs_mup.json"
        path.write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
        print(f"wrote {path} (1-min load average at the end: {machine['load_avg_end'][0]:.1f})")
        return 0
    rows = []
    print(f"{'config':<12} {'threads':>7} {'load':>5} {'wall s':>8} {'exit':>4}  verdict")
    for name in args.configs:
        for threads in args.threads:
            row = run_one(name, threads, out)
            rows.append(row)
            asked = "auto" if threads == 0 else ""
            print(f"{name:<12} {asked + str(row['threads']):>7} {row['load_avg_before']:>5.1f} {row['wall_s']:>8.1f} "
                  f"{row['exit_status']:>4}  {row['summary'][0]}", flush=True)
    machine["load_avg_1min"] = os.getloadavg()[0]
    result = {"limit_s": LIMIT_S, "machine": machine, "runs": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} (1-min load average at the end: {machine['load_avg_1min']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
