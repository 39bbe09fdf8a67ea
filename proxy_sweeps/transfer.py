"""``mutransfer transfer-check``: does the optimal base LR stay put as the width grows?

A grid of widths (x2 steps) x learning rates (x2 steps by default) x seeds, for each
parametrization (``mup`` and the ``sp`` control side by side), every run scored on the held-out
loss. Runs are appended to DIR/runs.jsonl as they finish, so an interrupted check continues where
it stopped. Within one (parametrization, width, seed) the LRs run from small to large; once a run
diverges, the larger LRs are recorded as diverged without training (they would diverge too).
Diverged runs have loss NaN and are left out of the fits. Fits and verdict: ``analysis.transfer``.

File layout: [transfer] widths, parametrizations, lr_log2_low, lr_log2_high, lr_log2_step, seeds,
last_evals; then [model], [param], [data], [train], [hparams] as in a sweep file (the grid sets
the LR, so hparams.lr may not be given).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mutransfer.config import ConfigError, HParams, RunShape, from_mapping, load_toml
from mutransfer.parametrization import PARAMETRIZATIONS
from mutransfer.plan import hparams_from, shape_from_config
from mutransfer.presets import at_width
from mutransfer.training import Diverged, TrainConfig, train_proxy

TABLES = ("transfer", "model", "param", "data", "train", "hparams")
RUNS_FILE = "runs.jsonl"


@dataclass(frozen=True)
class TransferSettings:
    widths: list[int] = field(default_factory=list)
    parametrizations: list[str] = field(default_factory=lambda: ["mup", "sp"])
    lr_log2_low: float = -12.0
    lr_log2_high: float = -4.0
    lr_log2_step: float = 1.0  # 1.0: the x2 grid
    seeds: int = 2
    last_evals: int = 1


@dataclass(frozen=True)
class TransferSpec:
    settings: TransferSettings
    shape: RunShape
    data: str
    train: TrainConfig
    hparams: HParams
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def lr_log2(self) -> list[float]:
        s = self.settings
        n = int(round((s.lr_log2_high - s.lr_log2_low) / s.lr_log2_step)) + 1
        return [s.lr_log2_low + i * s.lr_log2_step for i in range(n)]

    def shape_at(self, parametrization: str, width: int) -> RunShape:
        param = dataclasses.replace(self.shape.param, parametrization=parametrization)
        return RunShape(model=at_width(self.shape.model, width), param=param)


def spec_from_mapping(data: dict, where: str = "transfer file") -> TransferSpec:
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; allowed: {list(TABLES)}")
    s = from_mapping(TransferSettings, data.get("transfer"), "transfer")
    widths = s.widths
    if len(widths) < 2 or any(not isinstance(w, int) or w <= 0 for w in widths):
        raise ConfigError(f"transfer.widths = {widths!r} must list at least two positive integer widths")
    for a, b in zip(widths, widths[1:], strict=False):
        if b != 2 * a:
            raise ConfigError(f"transfer.widths = {widths!r} must be a x2 grid, ascending (e.g. [32, 64, 128, 256])")
    if not s.parametrizations or any(p not in PARAMETRIZATIONS for p in s.parametrizations):
        raise ConfigError(f"transfer.parametrizations = {s.parametrizations!r}: choose from {list(PARAMETRIZATIONS)}")
    if not s.lr_log2_low < s.lr_log2_high or s.lr_log2_step <= 0:
        raise ConfigError(f"transfer.lr_log2_low = {s.lr_log2_low} must be below transfer.lr_log2_high = "
                          f"{s.lr_log2_high}, and transfer.lr_log2_step = {s.lr_log2_step} positive")
    steps = (s.lr_log2_high - s.lr_log2_low) / s.lr_log2_step
    if abs(steps - round(steps)) > 1e-9 or round(steps) < 2:
        raise ConfigError("transfer.lr_log2_high - lr_log2_low must be a whole number (>= 2) of lr_log2_step")
    if s.seeds < 1 or s.last_evals < 1:
        raise ConfigError("transfer.seeds and transfer.last_evals must be >= 1")
    if "lr" in data.get("hparams", {}):
        raise ConfigError("hparams.lr: the LR is the grid's (transfer.lr_log2_*); remove it")
    shape = shape_from_config({k: data[k] for k in ("model", "param") if k in data}, "transfer")
    for w in widths:
        at_width(shape.model, w)  # names the width that does not fit the head dim
    data_table = data.get("data", {})
    unknown = sorted(set(data_table) - {"spec"})
    if unknown:
        raise ConfigError(f"data: unknown field(s) {unknown}; allowed: ['spec']")
    train = from_mapping(TrainConfig, data.get("train"), "train").validate("train")
    hparams = hparams_from(data.get("hparams", {}))
    return TransferSpec(settings=s, shape=shape, data=data_table.get("spec", "builtin"), train=train,
                        hparams=hparams, raw=data)


def load_transfer_spec(path) -> TransferSpec:
    return spec_from_mapping(load_toml(path), Path(path).name)


# ---------------------------------------------------------------- runs


def run_key(r: dict) -> tuple:
    return (r["parametrization"], r["width"], float(r["lr_log2"]), r["seed"])


def read_runs(out_dir) -> list[dict]:
    path = Path(out_dir) / RUNS_FILE
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
                continue
    return runs


def append_run(out_dir, record: dict) -> None:
    with open(Path(out_dir) / RUNS_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def one_run(spec: TransferSpec, dataset, parametrization: str, width: int, lr_log2: float, seed: int) -> dict:
    shape = spec.shape_at(parametrization, width)
    hp = dataclasses.replace(spec.hparams, lr=2.0**lr_log2)
    tc = dataclasses.replace(spec.train, seed=spec.train.seed + seed, data_seed=spec.train.data_seed + seed)
    record = {"parametrization": parametrization, "width": width, "lr_log2": lr_log2, "lr": 2.0**lr_log2,
              "seed": seed}
    start = time.perf_counter()
    try:
        result = train_proxy(shape, hp, tc, dataset)
        loss = result.final_val(spec.settings.last_evals)
        record.update(status="ok" if math.isfinite(loss) else "diverged", loss=loss if math.isfinite(loss) else None,
                      val_losses=result.val_losses)
    except Diverged as e:
        record.update(status="diverged", loss=None, reason=e.reason)
    except Exception as e:  # noqa: BLE001 -- recorded; the grid goes on
        record.update(status="error", loss=None, reason=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _device(requested: str) -> str:
    """"auto" -> a GPU when there is one; pool worker k takes GPU k (mod the count)."""
    import torch

    if requested not in ("auto", "cuda") or not torch.cuda.is_available():
        return "cpu" if requested == "auto" else requested
    identity = multiprocessing.current_process()._identity
    return f"cuda:{(identity[0] - 1 if identity else 0) % torch.cuda.device_count()}"


def _chain(args) -> list[dict]:
    """One (parametrization, width, seed): LRs ascending, stop training after the first divergence."""
    out_dir, raw, parametrization, width, seed, todo, threads = args
    import torch

    from mutransfer.data.builtin import open_dataset

    torch.set_num_threads(threads)
    spec = spec_from_mapping(raw)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, device=_device(spec.train.device)))
    dataset = open_dataset(spec.data, spec.shape.model.tokenizer)
    done = {run_key(r): r for r in read_runs(out_dir)}
    diverged_at = None
    records = []
    for x in spec.lr_log2:
        key = (parametrization, width, float(x), seed)
        if key in done:
            if done[key]["status"] == "diverged":
                diverged_at = x if diverged_at is None else diverged_at
            continue
        if key not in todo:
            continue
        if diverged_at is not None:
            record = {"parametrization": parametrization, "width": width, "lr_log2": x, "lr": 2.0**x, "seed": seed,
                      "status": "diverged", "loss": None, "seconds": 0.0,
                      "reason": f"not run: diverged at the smaller lr 2^{diverged_at:g}"}
        else:
            record = one_run(spec, dataset, parametrization, width, x, seed)
            if record["status"] == "diverged":
                diverged_at = x
        append_run(out_dir, record)
        records.append(record)
    return records


def run_transfer_check(path, out_dir, workers: int = 1, quiet: bool = False) -> int:
    from analysis.transfer import analyze
    from mutransfer.data.builtin import open_dataset
    from proxy_sweeps.provenance import environment

    spec = load_transfer_spec(path)
    if workers < 1:
        raise ConfigError(f"--workers = {workers} must be >= 1")
    dataset = open_dataset(spec.data, spec.shape.model.tokenizer)  # checked before any compute
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"spec_file": str(Path(path).resolve()), "data_fingerprint": dataset.fingerprint,
              "lr_log2": spec.lr_log2, "spec": spec.raw}
    config_path = out / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("spec") != json.loads(
            json.dumps(spec.raw)):
        raise ConfigError(f"{out}: holds a transfer check of a different definition; use another --out")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")

    s = spec.settings
    done = {run_key(r) for r in read_runs(out)}
    chains = []
    for p in s.parametrizations:
        for w in s.widths:
            for seed in range(s.seeds):
                todo = {(p, w, float(x), seed) for x in spec.lr_log2} - done
                if todo:
                    chains.append((p, w, seed, todo))
    chains.sort(key=lambda c: -c[1])  # widest (slowest) first
    total = len(s.parametrizations) * len(s.widths) * s.seeds * len(spec.lr_log2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    tasks = [(str(out), spec.raw, p, w, seed, todo, threads) for p, w, seed, todo in chains]
    start, finished = time.perf_counter(), total - sum(len(c[3]) for c in chains)
    if not quiet:
        print(f"transfer-check: {len(s.parametrizations)} parametrizations x {len(s.widths)} widths x "
              f"{len(spec.lr_log2)} LRs x {s.seeds} seeds = {total} runs ({finished} already done), "
              f"{workers} worker(s)", file=sys.stderr)
    if tasks:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for records in pool.imap_unordered(_chain, tasks):
                finished += len(records)
                if not quiet and records:
                    r = records[0]
                    elapsed = time.perf_counter() - start
                    print(f"[{int(elapsed) // 60}m{int(elapsed) % 60:02d}s] {finished}/{total} runs; finished "
                          f"{r['parametrization']} width {r['width']} seed {r['seed']}", file=sys.stderr)
    verdict = analyze(out)
    if not quiet:
        from analysis.transfer import format_verdict

        print(format_verdict(verdict), file=sys.stderr)
    errors = [r for r in read_runs(out) if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} run(s) failed with an error, e.g. {errors[0]['reason']}", file=sys.stderr)
        return 1
    return 0 if verdict.get("pass") else 1
