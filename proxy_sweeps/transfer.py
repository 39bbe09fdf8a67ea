"""``mutransfer transfer-check``: does the optimal base LR stay put as the model or the run grows?

A grid of axis values x learning rates (x2 steps by default) x seeds, for each variant (a
parametrization, and for ``mup`` each depth exponent asked for), every run scored on the held-out
loss. The axis is one of

- ``width``: the preset's family at each width (head dim fixed);
- ``depth``: the preset with that many blocks (``param.depth_base`` stays the base depth);
- ``steps``: the token horizon -- the run's length (``warmup``/``decay`` from the [train] table, or
  ``transfer.warmup_fraction``/``decay_fraction`` of each horizon);
- ``batch_size``: the global batch at a fixed token budget (``transfer.tokens``), so the steps
  shrink as the batch grows; micro-batches of ``train.micro_batch_size`` are accumulated.

Runs are appended to DIR/runs.jsonl as they finish, so an interrupted check continues where it
stopped, and more seeds can be added later (``--seeds N``) without repeating the runs it has.
SIGTERM/SIGINT stop the worker processes (the runs in progress are redone by the next call) and
exit 128 + the signal; a worker whose main process is gone stops itself.
Within one (variant, axis value, seed) the LRs run from small to large; once a run diverges, the
larger LRs are recorded as diverged without training. Fits, intervals and the verdict:
``proxy_sweeps.transfer_verdict``; the figure: ``analysis.transfer``.

File layout: [transfer] (``TransferSettings``), then [model], [param], [data], [train], [hparams]
as in a sweep file (the grid sets the LR, so hparams.lr may not be given), and [tracking]
(mutransfer.tracking; not part of the definition): each run that trains is one tracker run, named
by its grid point and grouped by the file's name, with ``loss`` per step and ``val_loss`` per
evaluation. A file with a [target] table instead is a joint check (``proxy_sweeps.joint``), run on
this module's workers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mutransfer.config import (
    Config,
    ConfigError,
    HParams,
    Parametrization,
    PosInt,
    ProxyTrain,
    RunShape,
    apply_overrides,
    hparams_from,
    load_toml,
    parse,
    updated,
)
from mutransfer.model_size import check_fits_machine
from mutransfer.plan import shape_from_config
from mutransfer.rundir import (
    ENVIRONMENT_FILE,
    append_jsonl,
    check_output_dir,
    cpu_count,
    environment,
    read_json,
    read_jsonl,
    write_json,
)
from mutransfer.specs import at_depth, at_width
from mutransfer.tokenizer import check_model_vocab
from mutransfer.tracking import Tracking, TrackingSettings, check_installed
from mutransfer.tracking import prepare as prepare_tracking
from mutransfer.training import Diverged, train_proxy
from proxy_sweeps.joint_config import CONFIG_TABLES as JOINT_CONFIG_TABLES
from proxy_sweeps.joint_config import is_joint
from proxy_sweeps.processes import Stopped, stops_raised, watch_parent

TABLES = ("transfer", "model", "param", "data", "train", "hparams", "tracking")
RUNS_FILE = "runs.jsonl"
AXES = ("width", "depth", "steps", "batch_size")
# Octaves the optimum may move (width, depth: its drift over the span; horizon, batch: the fitted
# law's error at the held-out largest value).
DEFAULT_GOALS = {"width": 0.5, "depth": 0.5, "steps": 0.35, "batch_size": 0.35}
PROGRESS_EVERY_S = 10.0  # a progress line at least this often, runs finished or not (a run can take minutes)


class TransferSettings(Config):
    """``[transfer]``: the axis and its values, the variants, the LR grid, seeds and goals."""

    axis: Literal["width", "depth", "steps", "batch_size"] = "width"
    """width | depth | steps | batch_size: what moves between the runs"""
    values: list[PosInt] = Field(default_factory=list)
    """ascending, e.g. widths [32, 64, 128, 256]"""
    parametrizations: list[Parametrization] = Field(default_factory=lambda: ["mup", "sp"])
    """the variants checked side by side (mup, sp, xmodel)"""
    depth_alphas: list[Annotated[float, Field(ge=0.5, le=1.0)]] = Field(default_factory=list)
    """mup variants"""
    lr_log2_low: float = -12.0
    """smallest base LR of the grid, log2"""
    lr_log2_high: float = -4.0
    """largest base LR of the grid, log2"""
    lr_log2_step: Annotated[float, Field(gt=0)] = 1.0
    """1.0: the x2 grid"""
    tune: Literal["lr", "weight_decay"] = "lr"
    """what the grid varies; weight_decay: at the fixed hparams.lr"""
    wd_log2_low: float = -6.0
    """tune = 'weight_decay': the grid of the base weight decay"""
    wd_log2_high: float = 2.0
    """largest base weight decay of the grid, log2"""
    wd_log2_step: Annotated[float, Field(gt=0)] = 1.0
    """the weight-decay grid's step, in octaves"""
    seeds: PosInt = 2
    """runs per grid point (bootstrap intervals need 2 or more)"""
    last_evals: PosInt = 1
    """held-out evaluations averaged at the end of each run"""
    goal_octaves: Annotated[float, Field(gt=0)] | None = None
    """allowed drift/residual; default by axis"""
    min_span: Annotated[float, Field(ge=1)] = 8.0
    """largest / smallest axis value the goal needs"""
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.9
    """of the bootstrap intervals"""
    bootstrap: Annotated[int, Field(ge=0)] = 1000
    """resamples; 0: point estimates only (no intervals)"""
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None
    """steps axis: warmup per horizon"""
    decay_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None
    """steps axis: decay per horizon"""
    tokens: PosInt | None = None
    """batch_size axis: the fixed token budget of every run"""
    widths: list[PosInt] = Field(default_factory=list)
    """Power Lines check: model widths crossed with the steps values"""
    law_form: Literal["straight", "weighted"] = "straight"
    """steps and batch_size axes tuning the LR: the law's least squares, plain or weighted by the axis value
    (mutransfer.law_forms); judging only, the runs are the same"""

    @model_validator(mode="after")
    def _grid(self) -> TransferSettings:
        if len(self.values) < 2:
            raise ValueError(f"values = {self.values}: give at least two {self.axis} values")
        if sorted(set(self.values)) != self.values:
            raise ValueError(f"values = {self.values} must be ascending without repeats")
        if not self.parametrizations:
            raise ValueError("parametrizations: give at least one")
        prefix, low, high, step = self._grid_bounds()
        if not low < high:
            raise ValueError(f"{prefix}_log2_low = {low} must be below {prefix}_log2_high = {high}")
        steps = (high - low) / step
        if abs(steps - round(steps)) > 1e-9 or round(steps) < 2:
            raise ValueError(f"{prefix}_log2_high - {prefix}_log2_low must be a whole number (>= 2) of "
                             f"{prefix}_log2_step")
        if self.axis == "batch_size" and self.tokens is None:
            raise ValueError("axis = 'batch_size' needs tokens (the fixed token budget of every run)")
        if self.widths:
            self._check_widths()
        if self.law_form != "straight" and (self.axis not in ("steps", "batch_size") or self.tune != "lr"):
            raise ValueError(f"law_form = {self.law_form!r}: a law's form applies to the steps and batch_size axes "
                             f"tuning the LR, not axis = {self.axis!r}, tune = {self.tune!r}")
        if self.axis in ("steps", "batch_size") and len(self.values) < 3:
            raise ValueError(f"values = {self.values}: a {self.axis} law is fitted on all but the largest value, "
                             "so give at least three")
        return self

    def _check_widths(self) -> None:
        """A Power Lines check (``widths``): weight decay over widths x steps, one variant family."""
        if self.axis != "steps" or self.tune != "weight_decay":
            raise ValueError(f"widths = {self.widths}: a Power Lines check crosses widths with the steps axis "
                             f"tuning the weight decay (axis = 'steps', tune = 'weight_decay'), not axis = "
                             f"{self.axis!r}, tune = {self.tune!r}")
        if len(self.widths) < 2 or sorted(set(self.widths)) != self.widths:
            raise ValueError(f"widths = {self.widths}: give at least two, ascending without repeats")
        if len(self.parametrizations) != 1 or len(self.depth_alphas) > 1:
            raise ValueError("widths: a Power Lines check fits one law, so give one parametrization (and at most "
                             f"one depth alpha), not {self.parametrizations} {self.depth_alphas or ''}".rstrip())

    @property
    def goal(self) -> float:
        return self.goal_octaves if self.goal_octaves is not None else DEFAULT_GOALS[self.axis]

    @property
    def grid_key(self) -> str:
        """The record field of the grid's coordinate: ``lr_log2`` or ``wd_log2``."""
        return "lr_log2" if self.tune == "lr" else "wd_log2"

    def _grid_bounds(self) -> tuple[str, float, float, float]:
        """The tuned grid's field prefix (``lr`` or ``wd``) and its log2 low, high and step."""
        prefix = self.grid_key.removesuffix("_log2")
        return prefix, *(getattr(self, f"{prefix}_log2_{k}") for k in ("low", "high", "step"))

    @property
    def grid(self) -> list[float]:
        """The grid's log2 values, ascending."""
        _, low, high, step = self._grid_bounds()
        n = int(round((high - low) / step)) + 1
        return [low + i * step for i in range(n)]


# The transfer-check file's own table, for ``mutransfer schema`` (the rest are a sweep file's).
CONFIG_TABLES = ("Transfer-check file (mutransfer transfer-check)",
                 [("[transfer]", TransferSettings), *JOINT_CONFIG_TABLES])


class Variant(Config):
    """One curve family of the check: a parametrization (and its depth exponent)."""

    parametrization: Parametrization
    depth_alpha: float | None = None
    width: PosInt | None = None  # a Power Lines check's model width (transfer.widths)

    @property
    def family(self) -> str:
        """The name without the width: the points of one family share their bootstrap draws."""
        return self.parametrization if self.depth_alpha is None else f"{self.parametrization}(a={self.depth_alpha:g})"

    @property
    def name(self) -> str:
        return self.family if self.width is None else f"{self.family}-w{self.width}"


class TransferSpec:
    def __init__(self, settings: TransferSettings, shape: RunShape, data: str, train: ProxyTrain, hparams: HParams,
                 raw: dict, tracking: TrackingSettings | None = None):
        self.settings, self.shape, self.data, self.train, self.hparams, self.raw = \
            settings, shape, data, train, hparams, raw
        self.tracking = tracking or TrackingSettings()

    @property
    def grid(self) -> list[float]:
        """log2 of the tuned hyperparameter (the base LR, or the base weight decay), ascending."""
        return self.settings.grid

    def hparams_at(self, x: float) -> HParams:
        """The base hyperparameters of one grid point."""
        field = "lr" if self.settings.tune == "lr" else "weight_decay"
        return updated(self.hparams, "hparams", **{field: 2.0**x})

    @property
    def variants(self) -> list[Variant]:
        out = []
        for p in self.settings.parametrizations:
            if p == "mup" and self.settings.depth_alphas:
                out += [Variant(parametrization=p, depth_alpha=a) for a in self.settings.depth_alphas]
            else:
                out.append(Variant(parametrization=p))
        if self.settings.widths:  # a Power Lines check: every family at every width
            out = [updated(v, "transfer.widths", width=w) for v in out for w in self.settings.widths]
        return out

    def shape_at(self, variant: Variant, value: int) -> RunShape:
        """The model of one axis value (width and depth change the model; steps and batch do not)."""
        changes = {"parametrization": variant.parametrization}
        if variant.depth_alpha is not None:
            changes["depth_alpha"] = variant.depth_alpha
        param = updated(self.shape.param, "param", **changes)
        model = self.shape.model if variant.width is None else at_width(self.shape.model, variant.width)
        if self.settings.axis == "width":
            model = at_width(model, value)
        elif self.settings.axis == "depth":
            model = at_depth(model, value)
        return RunShape(model=model, param=param)

    def train_at(self, value: int) -> ProxyTrain:
        """The run's budget at one axis value (``transfer.values`` entries name the field in errors)."""
        s, tc = self.settings, self.train
        where = f"transfer.values ({s.axis} = {value})"
        if s.axis == "steps":
            changes = {"steps": value}
            if s.warmup_fraction is not None:
                changes["warmup"] = int(round(s.warmup_fraction * value))
            if s.decay_fraction is not None:
                changes["decay"] = int(round(s.decay_fraction * value))
            return updated(tc, where, **changes)
        if s.axis == "batch_size":
            per_step = value * tc.seq_len
            if s.tokens % per_step:
                raise ConfigError(f"{where}: transfer.tokens = {s.tokens} is not a whole number of steps of "
                                  f"{value} x {tc.seq_len} tokens")
            micro = tc.micro_batch_size or tc.batch_size
            if value % micro:
                raise ConfigError(f"{where}: batch {value} does not divide into micro-batches of "
                                  f"train.micro_batch_size = {micro}")
            steps = s.tokens // per_step
            changes = {"batch_size": value, "steps": steps, "micro_batch_size": micro}
            if s.warmup_fraction is not None:
                changes["warmup"] = int(round(s.warmup_fraction * steps))
            if s.decay_fraction is not None:
                changes["decay"] = int(round(s.decay_fraction * steps))
            changes["eval_every"] = min(tc.eval_every, steps)
            return updated(tc, where, **changes)
        return tc


def spec_from_mapping(data: dict, where: str = "transfer file") -> TransferSpec:
    if is_joint(data):
        raise ConfigError(f"{where}: a [target] (or [joint]) table makes it a joint check: `mutransfer "
                          "transfer-check` runs it, proxy_sweeps.joint reads it")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; allowed: {list(TABLES)}")
    settings = parse(TransferSettings, data.get("transfer"), "transfer")
    hp_table = data.get("hparams", {})
    if not isinstance(hp_table, dict):
        raise ConfigError("hparams: expected a table")
    if settings.tune == "lr" and "lr" in hp_table:
        raise ConfigError("hparams.lr: the LR is the grid's (transfer.lr_log2_*); remove it")
    if settings.tune == "weight_decay":
        if "weight_decay" in hp_table:
            raise ConfigError("hparams.weight_decay: the weight decay is the grid's (transfer.wd_log2_*); remove it")
        if "lr" not in hp_table:
            raise ConfigError("hparams.lr: transfer.tune = 'weight_decay' holds the base LR fixed; give it "
                              "(e.g. the optimum of an LR check at the smallest value)")
    shape = shape_from_config({k: data[k] for k in ("model", "param") if k in data}, "transfer")
    check_model_vocab(shape.model)
    data_table = data.get("data", {})
    if not isinstance(data_table, dict) or sorted(set(data_table) - {"spec"}):
        raise ConfigError("data: expected a table with only 'spec'")
    train = parse(ProxyTrain, data.get("train"), "train")
    tracking = parse(TrackingSettings, data.get("tracking"), "tracking")
    check_installed(tracking)
    spec = TransferSpec(settings=settings, shape=shape, data=data_table.get("spec", "builtin"), train=train,
                        hparams=hparams_from(hp_table), raw=data, tracking=tracking)
    for variant in spec.variants:
        for value in settings.values:  # every grid point must be a model and a budget, before compute
            check_fits_machine(spec.shape_at(variant, value), f"transfer.values: {settings.axis} {value}")
            spec.train_at(value)
    return spec


def load_transfer_spec(path, overrides=()) -> TransferSpec:
    return spec_from_mapping(apply_overrides(load_toml(path), overrides, TABLES), Path(path).name)


# ---------------------------------------------------------------- runs


def run_key(r: dict, grid_key: str = "lr_log2") -> tuple:
    return (r["variant"], int(r["value"]), float(r[grid_key]), int(r["seed"]))


def read_runs(out_dir) -> list[dict]:
    return read_jsonl(Path(out_dir) / RUNS_FILE)


def done_keys(out_dir, grid_key: str) -> set[tuple]:
    """The grid points already recorded in DIR/runs.jsonl (``run_key``)."""
    return {run_key(r, grid_key) for r in read_runs(out_dir) if grid_key in r}


def grid_record(spec: TransferSpec, variant: Variant, value: int, x: float, seed: int) -> dict:
    """The fields that name one grid point of a run record (the LR, and the weight decay when tuned)."""
    hp = spec.hparams_at(x)
    tuned_lr = spec.settings.tune == "lr"
    record = {"variant": variant.name, "parametrization": variant.parametrization, "axis": spec.settings.axis,
              "value": value, "lr_log2": x if tuned_lr else math.log2(hp.lr), "lr": hp.lr, "seed": seed}
    if not tuned_lr:
        record.update(wd_log2=x, weight_decay=hp.weight_decay)
    return record


def run_name(record: dict, grid_key: str) -> str:
    """A grid point's tracker run name, e.g. ``mup-width128-lr2^-8-seed0``."""
    knob = "lr" if grid_key == "lr_log2" else "wd"
    return f"{record['variant']}-{record['axis']}{record['value']}-{knob}2^{record[grid_key]:g}-seed{record['seed']}"


def one_run(spec: TransferSpec, dataset, variant: Variant, value: int, x: float, seed: int,
            tracking: Tracking | None = None, group: str = "transfer-check") -> dict:
    """Train one grid point; ``tracking``: trackers (not started) that get its curves as one run."""
    shape = spec.shape_at(variant, value)
    hp = spec.hparams_at(x)
    base = spec.train_at(value)
    tc = updated(base, "train", seed=base.seed + seed, data_seed=base.data_seed + seed)
    record = {**grid_record(spec, variant, value, x, seed), "width": shape.model.d_model,
              "depth": shape.model.n_layers, "steps": tc.steps, "batch_size": tc.batch_size}
    with tracking or Tracking(None, ".") as tracked:
        tracked.start(run_name(record, spec.settings.grid_key), group, {**record, "hparams": hp.model_dump(),
                                                                        "train": tc.model_dump()})
        _train_point(record, spec, dataset, shape, hp, tc, tracked)
        tracked.event("outcome", {k: record.get(k) for k in ("status", "loss", "reason", "seconds")})
        tracked.finish(failed=record["status"] == "error")
    return record


def _train_point(record: dict, spec: TransferSpec, dataset, shape: RunShape, hp: HParams, tc: ProxyTrain,
                 tracked: Tracking) -> None:
    """Train, and fill ``record`` with the outcome: status, loss, held-out curve, seconds."""
    start = time.perf_counter()
    try:
        result = train_proxy(shape, hp, tc, dataset, on_step=lambda step, loss: tracked.log({"loss": loss}, step),
                             on_eval=lambda step, val: tracked.log({"val_loss": val}, step - 1))
        loss = result.final_val(spec.settings.last_evals)
        ok = math.isfinite(loss)
        record.update(status="ok" if ok else "diverged", loss=loss if ok else None,
                      val_losses=result.val_losses, val_batches=result.final_val_batches(spec.settings.last_evals))
    except Diverged as e:
        record.update(status="diverged", loss=None, reason=e.reason)
    except Exception as e:  # noqa: BLE001 -- recorded; the grid goes on
        record.update(status="error", loss=None, reason=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - start, 2)


def _chain(args) -> list[dict]:
    """One (variant, axis value, seed): grid ascending; along the LR, stop training after the first
    divergence (a larger LR diverges too); weight decay has no such order, so every point trains."""
    # reader (optional): another check's spec_from_mapping (the joint check's)
    out_dir, raw, variant_dict, value, seed, todo, threads, group, *reader = args
    import torch

    from mutransfer.data.builtin import open_dataset

    torch.set_num_threads(threads)
    spec = (reader[0] if reader else spec_from_mapping)(raw)
    variant = Variant(**variant_dict)
    dataset = open_dataset(spec.data, spec.shape.model.tokenizer, vocab_size=spec.shape.model.vocab_size)
    key_of = spec.settings.grid_key
    done = {run_key(r, key_of): r for r in read_runs(out_dir)}
    diverged_at = None
    ordered = spec.settings.tune == "lr"
    records = []
    for x in spec.grid:
        key = (variant.name, value, float(x), seed)
        if key in done:
            if ordered and done[key]["status"] == "diverged":
                diverged_at = x if diverged_at is None else diverged_at
            continue
        if key not in todo:
            continue
        if diverged_at is not None:
            record = {**grid_record(spec, variant, value, x, seed), "status": "diverged", "loss": None,
                      "seconds": 0.0, "reason": f"not run: diverged at the smaller lr 2^{diverged_at:g}"}
        else:
            record = one_run(spec, dataset, variant, value, x, seed, Tracking(spec.tracking, out_dir), group)
            if ordered and record["status"] == "diverged":
                diverged_at = x
        append_run(out_dir, record)
        records.append(record)
    return records


def append_run(out_dir, record: dict) -> None:
    append_jsonl(Path(out_dir) / RUNS_FILE, record)


def _definition(spec: TransferSpec) -> dict:
    """What must not change between runs into one directory: everything but the seed count, the law's form
    (judging only) and the trackers."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("transfer", "tracking")}
    raw["transfer"] = {k: v for k, v in spec.raw.get("transfer", {}).items() if k not in ("seeds", "law_form")}
    return raw


def _pool_worker(parent: int) -> None:
    """A chain worker: Ctrl-C is the parent's to handle, and the worker ends when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent)


def _best_of_chain(records: list[dict], grid_key: str) -> str:
    """The best run of a finished chain (its lowest held-out loss and where on the grid), for the
    progress line: where this point's optimum lies so far."""
    ok = [r for r in records if r.get("status") == "ok" and math.isfinite(r.get("loss", math.nan))]
    if not ok:
        return ": no run finished ok"
    best = min(ok, key=lambda r: r["loss"])
    return f": best {grid_key} {best[grid_key]:g} (loss {best['loss']:.4f})"


def _run_chains(tasks: list, workers: int, out: Path, s, total: int, finished: int, start: float,
                quiet: bool) -> None:
    """The chains on ``workers`` processes, a progress line at least every PROGRESS_EVERY_S."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_pool_worker, initargs=(os.getpid(),)) as pool:
        chains_left = pool.imap_unordered(_chain, tasks)
        shown, shown_at = finished, time.perf_counter()
        while True:  # runs.jsonl is the count: a chain appends each run before it returns
            try:
                records = chains_left.next(timeout=PROGRESS_EVERY_S)
                note = "" if not records else (f"; finished {records[0]['variant']} {s.axis} "
                                               f"{records[0]['value']} seed {records[0]['seed']}"
                                               f"{_best_of_chain(records, s.grid_key)}")
            except multiprocessing.TimeoutError:  # a chain is still running
                note = ""
            except StopIteration:
                break
            finished = min(total, len(done_keys(out, s.grid_key)))
            now = time.perf_counter()
            if not quiet and (finished > shown or note or now - shown_at >= PROGRESS_EVERY_S):
                running = "" if finished > shown or note else f" ({min(workers, total - finished)} running)"
                shown, shown_at, elapsed = finished, now, now - start
                print(f"[{int(elapsed) // 60}m{int(elapsed) % 60:02d}s] {finished}/{total} runs{note}{running}",
                      file=sys.stderr)


def open_check_data(spec, out: Path, definition: dict, what: str, seeds_field: str, allow_data_change: bool):
    """The check's data, opened and checked before any compute (a transfer check's or a joint check's):
    a held-out split smaller than one evaluation is a warning; a re-run into ``out`` must have the same
    definition (only ``seeds_field`` may change) and the same data unless ``allow_data_change``."""
    from mutransfer.data.builtin import open_dataset
    from mutransfer.training import short_eval_warning

    dataset = open_dataset(spec.data, spec.shape.model.tokenizer, vocab_size=spec.shape.model.vocab_size)
    warning = short_eval_warning(dataset, spec.train)
    if warning:
        print(warning, file=sys.stderr)
    config_path = out / "config.json"
    if config_path.is_file():
        old = read_json(config_path, f"{what} config")
        if old.get("definition") != definition:
            raise ConfigError(f"{out}: holds a {what} of a different definition; use another --out "
                              f"(only {seeds_field} may change between runs into one directory)")
        if old.get("data_fingerprint") != dataset.fingerprint and not allow_data_change:
            raise ConfigError(f"{out}: its runs were trained on data with fingerprint "
                              f"{str(old.get('data_fingerprint'))[:16]}..., data {spec.data!r} now has "
                              f"{dataset.fingerprint[:16]}...; use another --out or pass --allow-data-change")
    return dataset


def run_transfer_check(path, out_dir, workers: int = 1, quiet: bool = False, overrides=(),
                       seeds: int | None = None, allow_data_change: bool = False) -> int:
    from proxy_sweeps.transfer_verdict import format_verdict, judge

    if workers < 1:
        raise ConfigError(f"--workers = {workers} must be >= 1")
    if seeds is not None:
        overrides = [*overrides, f"transfer.seeds={seeds}"]
    spec = load_transfer_spec(path, overrides)
    out = check_output_dir(out_dir)
    dataset = open_check_data(spec, out, _definition(spec), "transfer check", "transfer.seeds", allow_data_change)
    out.mkdir(parents=True, exist_ok=True)
    prepare_tracking(spec.tracking, out)  # e.g. MLflow's database, once, before the workers open runs in it
    write_json(out / "config.json", {"spec_file": str(Path(path).resolve()), "overrides": list(overrides),
                             "data_fingerprint": dataset.fingerprint, "tune": spec.settings.tune,
                             "grid_key": spec.settings.grid_key, "grid": spec.grid,
                             "definition": _definition(spec), "spec": spec.raw})
    write_json(out / ENVIRONMENT_FILE, environment())

    s = spec.settings
    done = done_keys(out, s.grid_key)
    chains = []
    for v in spec.variants:
        for value in s.values:
            for seed in range(s.seeds):
                todo = {(v.name, value, float(x), seed) for x in spec.grid} - done
                if todo:
                    chains.append((v, value, seed, todo))
    chains.sort(key=lambda c: -c[1])  # the largest (slowest) first
    total = len(spec.variants) * len(s.values) * s.seeds * len(spec.grid)
    threads = max(1, cpu_count() // workers)
    tasks = [(str(out), spec.raw, v.model_dump(), value, seed, todo, threads, Path(path).stem)
             for v, value, seed, todo in chains]
    start, finished = time.perf_counter(), total - sum(len(c[3]) for c in chains)
    if not quiet:
        knob = "LRs" if s.tune == "lr" else "weight decays"
        print(f"transfer-check ({s.axis}): {len(spec.variants)} variants x {len(s.values)} values x "
              f"{len(spec.grid)} {knob} x {s.seeds} seeds = {total} runs ({finished} already done), "
              f"{workers} worker(s)", file=sys.stderr)
    if tasks:
        try:
            with stops_raised():
                _run_chains(tasks, workers, out, s, total, finished, start, quiet)
        except Stopped as e:  # leaving the pool's block has terminated its workers
            print(f"stopped by signal {e.signum}: {len(done_keys(out, s.grid_key))} of {total} runs are in "
                  f"{out / RUNS_FILE}; run the same command again to continue (the runs done are kept)",
                  file=sys.stderr)
            return 128 + e.signum
    verdict = judge(out, spec)
    from analysis.transfer import draw

    draw(out)
    if not quiet:
        print(format_verdict(verdict), file=sys.stderr)
    errors = [r for r in read_runs(out) if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} run(s) failed with an error, e.g. {errors[0]['reason']}", file=sys.stderr)
        return 1
    return verdict["exit_status"]
