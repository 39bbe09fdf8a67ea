"""``mutransfer coord-check``: train a preset at several widths a few steps and judge μP in numbers.

Writes to ``--out``: config.json (the resolved settings), coord.parquet (one row per width,
seed, step, module, statistic), verdict.json and coord.png (remade from the parquet file by
``analysis.coord``). Exit status: 0 the check passes, 1 it fails, 2 bad input (before compute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from mutransfer.config import ConfigError
from mutransfer.coord import DEFAULT_LR, CoordConfig
from mutransfer.parametrization import OPTIMIZERS, PARAMETRIZATIONS


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.replace(",", " ").split())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--widths {text!r}: expected integers like 64,128,256") from e


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "coord-check", help="coordinate check: do activations and updates stay the same size as width grows?",
        description="Train PRESET at several widths for a few steps and fit, per module and step, the slope "
                    "of log2(mean |x|) against log2(width). Step s is the forward after s optimizer steps. "
                    "Passes when |slope| <= threshold at every step from 1 on (the logits may shrink at "
                    "step 1) and nothing grows at step 0. See docs/coord_check.md.")
    p.add_argument("preset", nargs="?", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--widths", type=_widths, default=(),
                   help="comma-separated widths (default: the preset's width x 1, 2, 4, 8, 16)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default: 10)")
    p.add_argument("--seeds", type=int, default=3, help="initialisation seeds per width (default: 3)")
    p.add_argument("--lr", type=float, help="base LR eta, applied from step 0 without warmup (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="hidden-matrix optimizer")
    p.add_argument("--param", choices=PARAMETRIZATIONS, default="mup", help="parametrization under test")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp8-emulated (default: fp32)")
    p.add_argument("--compare", choices=PARAMETRIZATIONS, help="also run this parametrization (e.g. sp) "
                   "as a control and draw both in one figure; the exit status is --param's verdict")
    p.add_argument("--batch-size", type=int, default=CoordConfig.batch_size,
                   help=f"sequences per step (default: {CoordConfig.batch_size})")
    p.add_argument("--seq-len", type=int, default=CoordConfig.seq_len,
                   help=f"tokens per sequence (default: {CoordConfig.seq_len})")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data batches (same for all widths)")
    p.add_argument("--stream-data", action="store_true",
                   help="a new batch at every step (default: one batch repeated, mup's fix_data)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the global gradient norm (default: off; the norm couples widths)")
    p.add_argument("--threshold", type=float, default=0.1, help="largest allowed |slope| (default: 0.1)")
    p.add_argument("--out", help="output directory (default: runs/coord-check/PRESET-PARAM-OPTIMIZER-PRECISION)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: the cores not already busy, judged by the load average)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=run)


def config_from_args(args) -> CoordConfig:
    """The resolved, validated config; ConfigError names the bad option."""
    cfg = CoordConfig(preset=args.preset, widths=tuple(args.widths), steps=args.steps, seeds=args.seeds,
                      lr=args.lr, optimizer=args.optimizer, param=args.param, precision=args.precision,
                      batch_size=args.batch_size, seq_len=args.seq_len, data_seed=args.data_seed,
                      fix_data=not args.stream_data, grad_clip=args.grad_clip,
                      device=args.device)
    cfg = cfg.resolved().validate()
    if args.compare == args.param:
        raise ConfigError(f"--compare {args.compare} is the parametrization under test; pick another")
    if not 0 < args.threshold < 10:
        raise ConfigError(f"--threshold = {args.threshold} must lie in (0, 10)")
    if args.data_seed < 0:
        raise ConfigError(f"--data-seed = {args.data_seed} must be >= 0")
    if args.threads < 0:
        raise ConfigError(f"--threads = {args.threads} must be >= 0")
    _check_precision(cfg)
    return cfg


def _check_precision(cfg: CoordConfig) -> None:
    """The backend must run here and every width must suit it (FP8 GEMMs need multiples of 16)."""
    from mutransfer.precision import available, check_dims

    ok, why = available(cfg.precision)
    if not ok:
        raise ConfigError(f"--precision {cfg.precision} cannot run here: {why}")
    for shape in cfg.shapes():
        check_dims(shape.model, cfg.precision, where=f"width {shape.model.d_model}")


def auto_threads() -> int:
    """Threads for the cores other jobs leave free: on a shared CPU, OpenMP threads that wait for a
    busy core slow every small op down (measured: 342 s with 2 threads vs 83 s with 1 on two
    cores with a load of 4; 33 s vs 52 s when idle)."""
    try:
        busy = int(os.getloadavg()[0])  # whole cores kept busy by other jobs
    except (AttributeError, OSError):  # no load average on this platform
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def default_out(cfg: CoordConfig) -> Path:
    return Path("runs") / "coord-check" / f"{cfg.preset}-{cfg.param}-{cfg.optimizer}-{cfg.precision}"


def write_config(out: Path, cfg: CoordConfig, args) -> dict:
    """config.json: everything needed to rerun or re-judge the check from the directory alone."""
    config = {**dataclasses.asdict(cfg), "widths": list(cfg.widths), "compare": args.compare,
              "threshold": args.threshold, "statistic": "l1", "hparams": dataclasses.asdict(cfg.hparams()),
              "threads": args.threads, "command": rerun_command(cfg, args),
              "versions": {"mutransfer": version("mutransfer"), "torch": version("torch")}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def rerun_command(cfg: CoordConfig, args) -> str:
    """The command line that repeats this check, every default spelled out."""
    parts = ["mutransfer coord-check", cfg.preset, "--widths", ",".join(map(str, cfg.widths)),
             "--steps", str(cfg.steps), "--seeds", str(cfg.seeds), "--lr", f"{cfg.lr:g}",
             "--optimizer", cfg.optimizer, "--param", cfg.param, "--precision", cfg.precision,
             "--batch-size", str(cfg.batch_size), "--seq-len", str(cfg.seq_len), "--data-seed", str(cfg.data_seed),
             "--grad-clip", f"{cfg.grad_clip:g}", "--threshold", f"{args.threshold:g}"]
    parts += ["--stream-data"] if not cfg.fix_data else []
    parts += ["--compare", args.compare] if args.compare else []
    return " ".join(parts)


def run(args) -> int:
    import pandas as pd

    from analysis.coord import remake
    from mutransfer.coord import run_coord_check
    from mutransfer.data.builtin import builtin_dataset

    cfg = config_from_args(args)
    args.threads = args.threads or auto_threads()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("coord.parquet", "verdict.json", "coord.png"):  # never leave a previous run's results
        (out / name).unlink(missing_ok=True)
    write_config(out, cfg, args)
    dataset = builtin_dataset(tokenizer=cfg.shapes()[0].model.tokenizer)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[coord-check {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    params = [cfg.param] + ([args.compare] if args.compare else [])
    records = []
    for param in params:
        records += run_coord_check(dataclasses.replace(cfg, param=param), dataset, progress)
    pd.DataFrame.from_records(records).to_parquet(out / "coord.parquet", index=False)
    result = remake(out)
    for line in result["summary"]:
        print(line)
    if not result["passed"]:
        _print_failures(result)
    print(f"wrote {out}/coord.parquet, verdict.json, coord.png ({time.perf_counter() - start:.1f}s)")
    return 0 if result["passed"] else 1


def _print_failures(result: dict) -> None:
    for name in result["failing_modules"]:
        m = result["modules"][name]
        slopes = " ".join(f"{v:+.2f}" if v is not None else "nan" for v in m["slopes"].values())
        print(f"  {name}: slope by step {slopes} (failed at steps {m['failed_steps']})")
