"""``mutransfer coord-check``: train a preset at several widths (or depths) a few steps and judge μP in numbers.

Writes to ``--out``: config.json (the resolved settings), coord.parquet (one row per axis value,
seed, step, module, statistic), verdict.json (``mutransfer.coord_verdict``) and coord.png (drawn
from those files by ``analysis.coord``). Exit status: 0 the check passes, 1 it fails, 2 bad input
(before compute).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mutransfer.config import OPTIMIZERS, PARAMETRIZATIONS, ConfigError, apply_overrides, parse
from mutransfer.coord_config import DEFAULT_LR, CoordConfig
from mutransfer.model_size import check_fits_machine
from mutransfer.rundir import ENVIRONMENT_FILE, check_output_dir, environment, write_json
from mutransfer.tokenizer import check_model_vocab
from mutransfer.tracking import Tracking, check_installed
from mutransfer.tracking import prepare as prepare_tracking
from mutransfer.tracking.settings import TRACK_HELP, track_override


def _ints(text: str) -> list[int]:
    try:
        return [int(w) for w in text.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 64,128,256") from e


# CLI flag -> CoordConfig field (flags left out keep the config's default).
FLAGS = ("spec", "widths", "depths", "steps", "seeds", "lr", "optimizer", "param", "precision", "batch_size", "seq_len",
         "data_seed", "grad_clip", "update_tokens", "threshold", "device")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "coord-check", help="coordinate check: do activations and updates stay the same size as width grows?",
        description="Train PRESET at several widths (or depths) for a few steps and fit, per module and step, "
                    "the slope of log2(mean |x|) against log2(width). Step s is the forward after s optimizer "
                    "steps. Passes when |slope| <= threshold at every step from 1 on (the logits may shrink at "
                    "step 1) and nothing grows at step 0. See docs/coord_check.md.")
    p.add_argument("preset", nargs="?", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--spec", help="check a model of your own instead of a preset: 'package.module:factory' "
                   "returning a mutransfer ModelSpec (factory arguments: --set spec_args.NAME=VALUE; "
                   "docs/any_model.md)")
    p.add_argument("--widths", type=_ints, help="comma-separated widths (default: the preset's width x 1, 2, 4, 8, 16)")
    p.add_argument("--depths", type=_ints, help="comma-separated depths: check along depth at the preset's width")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: 10)")
    p.add_argument("--seeds", type=int, help="initialisation seeds per width (default: 3)")
    p.add_argument("--lr", type=float, help="base LR eta, applied from step 0 without warmup (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="hidden-matrix optimizer (default: adamw)")
    p.add_argument("--param", choices=PARAMETRIZATIONS, help="parametrization under test (default: mup)")
    p.add_argument("--precision", help="fp32 | bf16 | fp8-emulated (default: fp32)")
    p.add_argument("--compare", choices=PARAMETRIZATIONS, help="also run this parametrization (e.g. sp) "
                   "as a control and draw both in one figure; the exit status is --param's verdict")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default: {CoordConfig().batch_size})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default: {CoordConfig().seq_len})")
    p.add_argument("--data-seed", type=int, help="seed of the data batches (same for all widths)")
    p.add_argument("--stream-data", action="store_true",
                   help="a new batch at every step (default: one batch repeated, mup's fix_data)")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm (default: off; the norm couples "
                   "widths)")
    p.add_argument("--update-tokens", type=int, help="tokens of the batch (evenly spaced) on which the update "
                   f"effect dW x is measured; 0 = all (default: {CoordConfig().update_tokens})")
    p.add_argument("--threshold", type=float, help="largest allowed |slope| (default: 0.1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any coord-check field, e.g. seeds=5 or fix_data=false (repeatable)")
    p.add_argument("--out", help="output directory (default: runs/coord-check/PRESET-PARAM-OPTIMIZER-PRECISION)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: the cores not already busy, judged by the load average)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--track", metavar="BACKENDS", help=TRACK_HELP + " (a tracker run per width or depth and seed)")
    p.set_defaults(func=run)


def config_from_args(args) -> CoordConfig:
    """The resolved, validated config; ConfigError names the bad option."""
    raw = {"preset": args.preset, **{k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}}
    if args.stream_data:
        raw["fix_data"] = False
    apply_overrides(raw, [*args.overrides, *([track_override(args.track)] if args.track is not None else [])])
    cfg = parse(CoordConfig, raw, "coord-check").resolved()
    check_installed(cfg.tracking)
    cfg.check_device()
    shapes = cfg.shapes()
    check_model_vocab(shapes[0].model)  # every width has the same vocabulary
    for shape in shapes:
        check_fits_machine(shape, f"{cfg.axis} {shape.model.d_model if cfg.axis == 'width' else shape.model.n_layers}")
    if args.compare == cfg.param:
        raise ConfigError(f"--compare {args.compare} is the parametrization under test; pick another")
    if args.threads < 0:
        raise ConfigError(f"--threads = {args.threads} must be >= 0")
    _check_precision(cfg)
    return cfg


def _check_precision(cfg: CoordConfig) -> None:
    """The backend must run here and every width must suit it (FP8 GEMMs need multiples of 16)."""
    from mutransfer.precision import available, check_dims

    ok, why = available(cfg.precision)
    if not ok:
        raise ConfigError(f"precision {cfg.precision} cannot run here: {why}")
    for shape in cfg.shapes():
        check_dims(shape.model, cfg.precision, where=f"width {shape.model.d_model}")


def auto_threads() -> int:
    """Threads for the cores other jobs leave free: on a shared CPU, OpenMP threads that wait for a
    busy core slow every small op down (measured: 342 s with 2 threads vs 83 s with 1 on two
    cores with a load of 4; 33 s vs 52 s when idle)."""
    import torch

    try:
        busy = int(os.getloadavg()[0])  # whole cores kept busy by other jobs
    except (AttributeError, OSError):  # no load average on this platform
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def default_out(cfg: CoordConfig) -> Path:
    name = cfg.name.replace(":", "-").replace(".", "-")
    return Path("runs") / "coord-check" / f"{name}-{cfg.param}-{cfg.optimizer}-{cfg.precision}"


def write_config(out: Path, cfg: CoordConfig, args) -> dict:
    """config.json: everything needed to rerun or re-judge the check from the directory alone."""
    config = {**cfg.model_dump(), "axis": cfg.axis, "compare": args.compare, "statistic": "l1",
              "hparams": cfg.hparams().model_dump(), "threads": args.threads, "command": rerun_command(cfg, args)}
    write_json(out / "config.json", config)
    write_json(out / ENVIRONMENT_FILE, environment(device=cfg.device))
    return config


def rerun_command(cfg: CoordConfig, args) -> str:
    """The command line that repeats this check, every default spelled out."""
    axis = ["--depths", ",".join(map(str, cfg.depths))] if cfg.depths else ["--widths", ",".join(map(str, cfg.widths))]
    spec = ["--spec", cfg.spec, *(f"--set spec_args.{k}={v!r}" for k, v in cfg.spec_args.items())] if cfg.spec else []
    parts = ["mutransfer coord-check", cfg.preset, *spec, *axis,
             "--steps", str(cfg.steps), "--seeds", str(cfg.seeds), "--lr", f"{cfg.lr:g}",
             "--optimizer", cfg.optimizer, "--param", cfg.param, "--precision", cfg.precision,
             "--batch-size", str(cfg.batch_size), "--seq-len", str(cfg.seq_len), "--data-seed", str(cfg.data_seed),
             "--grad-clip", f"{cfg.grad_clip:g}", "--update-tokens", str(cfg.update_tokens),
             "--threshold", f"{cfg.threshold:g}"]
    parts += ["--stream-data"] if not cfg.fix_data else []
    parts += ["--compare", args.compare] if args.compare else []
    return " ".join(parts)


def run(args) -> int:
    import pandas as pd
    import torch

    from analysis.coord import draw
    from mutransfer.coord import run_coord_check
    from mutransfer.coord_verdict import judge
    from mutransfer.data.builtin import builtin_dataset

    cfg = config_from_args(args)
    args.threads = args.threads or auto_threads()
    torch.set_num_threads(args.threads)
    out = check_output_dir(Path(args.out) if args.out else default_out(cfg))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("coord.parquet", "verdict.json", "coord.png"):  # never leave a previous run's results
        (out / name).unlink(missing_ok=True)
    write_config(out, cfg, args)
    dataset = builtin_dataset(tokenizer=cfg.shapes()[0].model.tokenizer)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[coord-check {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    params = [cfg.param] + ([args.compare] if args.compare else [])
    prepare_tracking(cfg.tracking, out)

    def track(base: dict, rows: list[dict]) -> None:
        if cfg.tracking.backends:
            with Tracking(cfg.tracking, out) as tracking:
                tracking.start(run_name(base), out.resolve().name, {**config_of(cfg), **base})
                for step, metrics in curves(rows).items():
                    tracking.log(metrics, step)

    records = []
    for param in params:
        records += run_coord_check(cfg.model_copy(update={"param": param}), dataset, progress, on_run=track)
    pd.DataFrame.from_records(records).to_parquet(out / "coord.parquet", index=False)
    result = judge(out)
    draw(out)
    for line in result["summary"]:
        print(line)
    if not result["passed"]:
        _print_failures(result)
    print(f"wrote {out}/coord.parquet, verdict.json, coord.png ({time.perf_counter() - start:.1f}s)")
    return 0 if result["passed"] else 1


def run_name(base: dict) -> str:
    """One run's tracker name, e.g. ``mup-width256-seed1``."""
    return f"{base['param']}-{base['axis']}{base[base['axis']]}-seed{base['seed']}"


def config_of(cfg: CoordConfig) -> dict:
    return cfg.model_dump(exclude={"tracking"}) | {"hparams": cfg.hparams().model_dump()}


def curves(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Step -> ``loss`` and ``<statistic>/<kind>``: the mean over the kind's modules (one run's rows)."""
    sums: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        name = "loss" if r["kind"] == "loss" else f"{r['statistic']}/{r['kind']}"
        sums.setdefault(r["step"], {}).setdefault(name, []).append(r["value"])
    return {step: {k: sum(v) / len(v) for k, v in by_name.items()} for step, by_name in sorted(sums.items())}


def _print_failures(result: dict) -> None:
    for name in result["failing_modules"]:
        m = result["modules"][name]
        slopes = " ".join(f"{v:+.2f}" if v is not None else "nan" for v in m["slopes"].values())
        print(f"  {name}: slope by step {slopes} (failed at steps {m['failed_steps']})")
