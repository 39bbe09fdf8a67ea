"""The sweep file: what a proxy sweep trains, what it searches, and how it judges a trial.

A sweep TOML has these tables, each a typed model (mutransfer.config: unknown keys, wrong types,
NaN/inf and out-of-range numbers fail before any compute, naming the field):

    [sweep]      name (default study name), trials (logical trials of the study), heartbeat_interval,
                 grace_period (seconds; a trial silent this long is failed and retried), max_retries
    [model]      preset + field overrides + width/depth (as for ``mutransfer plan``); [param] too
    [data]       spec = "builtin" or a prepared dataset directory
    [train]      the trial's budget and settings: mutransfer.config.ProxyTrain
    [hparams]    fixed base hyperparameters (HParams fields) for everything not searched
    [objective]  last_evals (held-out evaluations averaged), seeds (repeats averaged)
    [sampler]    kind = tpe | random | cmaes | grid | gp, seed, n_startup_trials, multivariate
    [pruner]     kind = hyperband | median | none, and their settings
    [search.X]   low/high (+ log, step) or choices, for X an HParams field or train.warmup
    [tracking]   experiment trackers fed a run per trial (mutransfer.tracking); not part of the
                 study's definition, so it may change between invocations

The raw mapping is kept next to the parsed spec so a worker process re-parses the very same file
(config.json) and a re-run can tell whether the study's definition changed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mutransfer.config import (
    HPARAM_FLOAT_FIELDS,
    Config,
    ConfigError,
    HParams,
    NonNegInt,
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
from mutransfer.tokenizer import check_model_vocab
from mutransfer.tracking import TrackingSettings, check_installed

TABLES = ("sweep", "model", "param", "data", "train", "hparams", "objective", "sampler", "pruner", "search",
          "tracking")
SAMPLERS = ("tpe", "random", "cmaes", "grid", "gp")
PRUNERS = ("hyperband", "median", "none")
# Schedule fields a sweep may search besides the HParams fields; they belong to the proxy's budget,
# so freeze records them as provenance, not as base hyperparameters.
TRAIN_SEARCHABLE = ("warmup",)
HPARAM_FIELDS = HPARAM_FLOAT_FIELDS


class SweepSettings(Config):
    name: str = "sweep"
    """the Optuna study's name (--study overrides)"""
    trials: PosInt = 20
    """logical trials: a retried trial counts once"""
    heartbeat_interval: PosInt = 10
    """seconds between a running trial's heartbeats"""
    grace_period: PosInt = 60
    """seconds without a heartbeat before a trial counts as lost"""
    max_retries: NonNegInt = 2
    """retries of a trial whose worker died or was stopped"""

    @model_validator(mode="after")
    def _grace(self) -> SweepSettings:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period = {self.grace_period} must exceed heartbeat_interval = "
                             f"{self.heartbeat_interval}")
        return self


class DataSpec(Config):
    spec: str = "builtin"
    """builtin or a prepared data directory (relative paths: against the current directory)"""


class ObjectiveSpec(Config):
    last_evals: PosInt = 2
    """held-out evaluations averaged at the end of a run"""
    seeds: PosInt = 1
    """repeats (model init and batch order) averaged per trial"""


class SamplerSpec(Config):
    kind: Literal["tpe", "random", "cmaes", "grid", "gp"] = "tpe"
    """tpe | random | cmaes | grid | gp (Optuna's samplers)"""
    seed: NonNegInt = 0
    """sampler seed; each worker and invocation derives its own from it"""
    n_startup_trials: NonNegInt = 8
    """tpe, gp, cmaes: random trials before the model kicks in"""
    multivariate: bool = True
    """tpe"""


class PrunerSpec(Config):
    kind: Literal["hyperband", "median", "none"] = "hyperband"
    """hyperband | median | none (Optuna's pruners, on the held-out loss)"""
    min_resource: NonNegInt = 0
    """hyperband: first rung, in reported steps; 0 = the first evaluation"""
    reduction_factor: Annotated[int, Field(ge=2)] = 3
    """hyperband"""
    n_startup_trials: NonNegInt = 4
    """median"""
    n_warmup_steps: NonNegInt = 0
    """median: never prune before this reported step"""


class SearchParam(Config):
    """One searched hyperparameter: a range (low/high, log, step) or a list of choices."""

    low: float | None = None
    """smallest value of the range"""
    high: float | None = None
    """largest value of the range"""
    log: bool = False
    """sample the range on a log scale"""
    step: Annotated[float, Field(gt=0)] | None = None
    """grid step of the range (integers: warmup)"""
    choices: list[float] | None = None
    """a list of values instead of a range"""

    @model_validator(mode="after")
    def _shape(self) -> SearchParam:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must be a non-empty list")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError(f"choices = {self.choices} has duplicates")
            return self
        if self.low is None or self.high is None:
            raise ValueError("low and high are required (or give choices)")
        if not self.low < self.high:
            raise ValueError(f"low = {self.low} must be below high = {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low = {self.low} must be > 0 with log = true")
        if self.log and self.step is not None:
            raise ValueError("step and log = true cannot be combined")
        return self

    def values(self) -> list[float]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class NamedSearchParam(SearchParam):
    name: str

    @property
    def is_int(self) -> bool:
        return self.name in TRAIN_SEARCHABLE


class SweepSpec:
    """The parsed sweep file. Plain attributes; ``raw`` is the mapping it came from."""

    def __init__(self, sweep: SweepSettings, shape: RunShape, data: DataSpec, train: ProxyTrain, hparams: HParams,
                 objective: ObjectiveSpec, sampler: SamplerSpec, pruner: PrunerSpec,
                 search: tuple[NamedSearchParam, ...], raw: dict, tracking: TrackingSettings | None = None):
        self.sweep, self.shape, self.data, self.train, self.hparams = sweep, shape, data, train, hparams
        self.objective, self.sampler, self.pruner, self.search, self.raw = objective, sampler, pruner, search, raw
        self.tracking = tracking or TrackingSettings()

    @property
    def preset(self) -> str | None:
        return self.raw.get("model", {}).get("preset")

    @property
    def max_step(self) -> int:
        """The last step reported to the pruner: seeds run one after another."""
        return self.objective.seeds * self.train.steps

    def definition_hash(self) -> str:
        return definition_hash(self.raw)


def definition_hash(raw: dict) -> str:
    """Hash of everything that defines the study except its trial budget, retry and tracking settings;
    ``raw`` is a spec's mapping (also as config.json keeps it)."""
    body = {k: v for k, v in raw.items() if k not in ("sweep", "tracking")}
    body["sweep"] = {k: v for k, v in raw.get("sweep", {}).items() if k == "name"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _table(data: dict, name: str) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table")
    return value


def spec_from_mapping(data: dict, where: str = "sweep file") -> SweepSpec:
    """Parse and check a sweep mapping; every error names the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; allowed: {list(TABLES)}")
    for name in TABLES:
        _table(data, name)
    sweep = parse(SweepSettings, data.get("sweep"), "sweep")
    if "model" not in data:
        raise ConfigError("model: missing; give at least model.preset (e.g. 'tiny')")
    shape = shape_from_config({k: data[k] for k in ("model", "param") if k in data}, "sweep")
    check_model_vocab(shape.model)
    check_fits_machine(shape)
    data_spec = parse(DataSpec, data.get("data"), "data")
    train = parse(ProxyTrain, data.get("train"), "train")
    hparams = hparams_from(_table(data, "hparams"))
    objective = parse(ObjectiveSpec, data.get("objective"), "objective")
    n_evals = train.steps // train.eval_every + (train.steps % train.eval_every > 0)
    if objective.last_evals > n_evals:
        raise ConfigError(f"objective.last_evals = {objective.last_evals} exceeds the {n_evals} held-out "
                          f"evaluations a run makes (train.steps / train.eval_every)")
    sampler = parse(SamplerSpec, data.get("sampler"), "sampler")
    if sampler.kind == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as e:
            raise ConfigError("sampler.kind = 'cmaes' needs the 'cmaes' package (pip install cmaes)") from e
    pruner = parse(PrunerSpec, data.get("pruner"), "pruner")
    search = _search(_table(data, "search"), data, train, hparams)
    tracking = parse(TrackingSettings, data.get("tracking"), "tracking")
    check_installed(tracking)
    if sampler.kind == "grid":
        for p in search:
            if p.choices is None:
                raise ConfigError(f"search.{p.name}: sampler.kind = 'grid' needs choices for every parameter")
    return SweepSpec(sweep=sweep, shape=shape, data=data_spec, train=train, hparams=hparams,
                     objective=objective, sampler=sampler, pruner=pruner, search=search, raw=data, tracking=tracking)


def _search(table: dict, data: dict, train: ProxyTrain, hparams: HParams) -> tuple[NamedSearchParam, ...]:
    if not table:
        raise ConfigError("search: no hyperparameter to search; add e.g. [search.lr] low = 1e-3, high = 1e-1, "
                          "log = true")
    allowed = HPARAM_FIELDS + TRAIN_SEARCHABLE
    search = []
    for name, sub in table.items():
        if name not in allowed:
            raise ConfigError(f"search.{name} is not a searchable hyperparameter; allowed: {list(allowed)}")
        if name in _table(data, "hparams"):
            raise ConfigError(f"search.{name}: also fixed in hparams.{name}; keep one")
        if not isinstance(sub, dict):
            raise ConfigError(f"search.{name}: expected a table with low/high or choices")
        p = parse(NamedSearchParam, {**sub, "name": name}, f"search.{name}")
        for value in p.values():  # each end of the range must be a valid setting
            if p.is_int:
                if value != int(value):
                    raise ConfigError(f"search.{name}: {value} must be a whole number ({name} is an integer)")
                updated(train, f"search.{name}", **{name: int(value)})
            else:
                updated(hparams, f"search.{name}", **{name: float(value)})
        if p.is_int and p.step is not None and p.step != int(p.step):
            raise ConfigError(f"search.{name}.step = {p.step} must be a whole number ({name} is an integer)")
        search.append(p)
    return tuple(search)


def load_spec(path: str | Path, overrides=()) -> SweepSpec:
    data = apply_overrides(load_toml(path), overrides, TABLES)
    data.setdefault("sweep", {}).setdefault("name", Path(path).stem)
    return spec_from_mapping(data, Path(path).name)


def grid_size(spec: SweepSpec) -> int | None:
    if spec.sampler.kind != "grid":
        return None
    return math.prod(len(p.choices) for p in spec.search)


def resolved(spec: SweepSpec) -> dict:
    """The spec with every default filled in, for config.json (humans read this one)."""
    return {
        "sweep": spec.sweep.model_dump(),
        "model": spec.shape.model.model_dump(),
        "param": spec.shape.param.model_dump(),
        "preset": spec.preset,
        "data": spec.data.model_dump(),
        "train": spec.train.model_dump(),
        "hparams": spec.hparams.model_dump(),
        "objective": spec.objective.model_dump(),
        "sampler": spec.sampler.model_dump(),
        "pruner": spec.pruner.model_dump(),
        "search": {p.name: p.model_dump(exclude={"name"}, exclude_none=True) for p in spec.search},
        "tracking": spec.tracking.model_dump(),
    }


# The sweep file's tables, for ``mutransfer schema`` (entry point ``mutransfer.configs``).
CONFIG_TABLES = ("Sweep file (mutransfer sweep)",
                 [("[sweep]", SweepSettings), ("[data]", DataSpec), ("[objective]", ObjectiveSpec),
                  ("[sampler]", SamplerSpec), ("[pruner]", PrunerSpec), ("[search.NAME]", SearchParam)])
