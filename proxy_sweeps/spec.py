"""The sweep file: what a proxy sweep trains, what it searches, and how it judges a trial.

A sweep TOML has these tables (all checked here, before any compute, with the field named):

    [sweep]      name (default study name), trials (total for the study), heartbeat_interval,
                 grace_period (seconds; a trial silent this long is failed and retried once)
    [model]      preset + field overrides + width (as for ``mutransfer plan``); [param] too
    [data]       spec = "builtin" or a prepared dataset directory
    [train]      the trial's budget: mutransfer.training.TrainConfig fields; device may be "auto"
    [hparams]    fixed base hyperparameters (HParams fields) for everything not searched
    [objective]  last_evals (held-out evaluations averaged), seeds (repeats averaged)
    [sampler]    kind = tpe | random | cmaes | grid | gp, seed, n_startup_trials, multivariate
    [pruner]     kind = hyperband | median | none, and their settings
    [search.X]   low/high (+ log, step) or choices, for X an HParams field or train.warmup

The raw mapping is kept next to the parsed spec so a worker process re-parses the very same file
(config.json) and a re-run can tell whether the study's definition changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mutransfer.config import ConfigError, HParams, RunShape, from_mapping, load_toml
from mutransfer.plan import hparams_from, shape_from_config
from mutransfer.training import TrainConfig

TABLES = ("sweep", "model", "param", "data", "train", "hparams", "objective", "sampler", "pruner", "search")
SAMPLERS = ("tpe", "random", "cmaes", "grid", "gp")
PRUNERS = ("hyperband", "median", "none")
# Schedule fields a sweep may search besides the HParams fields; they belong to the proxy's budget,
# so freeze records them as provenance, not as base hyperparameters.
TRAIN_SEARCHABLE = ("warmup",)
HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(HParams) if f.type in ("float", float))


@dataclass(frozen=True)
class SweepSettings:
    name: str = "sweep"
    trials: int = 20
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # seconds without a heartbeat before a trial counts as lost


@dataclass(frozen=True)
class DataSpec:
    spec: str = "builtin"


@dataclass(frozen=True)
class ObjectiveSpec:
    last_evals: int = 2  # held-out evaluations averaged at the end of a run
    seeds: int = 1  # repeats (model init and batch order) averaged per trial


@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 8  # tpe, gp, cmaes: random trials before the model kicks in
    multivariate: bool = True  # tpe


@dataclass(frozen=True)
class PrunerSpec:
    kind: str = "hyperband"
    min_resource: int = 0  # hyperband: first rung, in reported steps; 0 = the first evaluation
    reduction_factor: int = 3  # hyperband
    n_startup_trials: int = 4  # median
    n_warmup_steps: int = 0  # median: never prune before this reported step


@dataclass(frozen=True)
class SearchParam:
    """One searched hyperparameter: a range (low/high, log, step) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    @property
    def is_int(self) -> bool:
        return self.name in TRAIN_SEARCHABLE


@dataclass(frozen=True)
class SweepSpec:
    sweep: SweepSettings
    shape: RunShape
    data: DataSpec
    train: TrainConfig
    hparams: HParams  # fixed base values; searched ones are overwritten per trial
    objective: ObjectiveSpec
    sampler: SamplerSpec
    pruner: PrunerSpec
    search: tuple[SearchParam, ...]
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def preset(self) -> str | None:
        return self.raw.get("model", {}).get("preset")

    @property
    def max_step(self) -> int:
        """The last step reported to the pruner: seeds run one after another."""
        return self.objective.seeds * self.train.steps

    def definition_hash(self) -> str:
        """Hash of everything that defines the study except its trial count."""
        body = {k: v for k, v in self.raw.items() if k != "sweep"}
        body["sweep"] = {k: v for k, v in self.raw.get("sweep", {}).items() if k == "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _search_param(name: str, table, where: str) -> SearchParam:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with low/high or choices")
    allowed = {"low", "high", "log", "step", "choices"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    if "choices" in table:
        if set(table) - {"choices"}:
            raise ConfigError(f"{where}: give either choices or low/high, not both")
        choices = table["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices = {choices!r} must be a non-empty list")
        for c in choices:
            if not isinstance(c, (int, float)) or isinstance(c, bool):
                raise ConfigError(f"{where}.choices = {choices!r} must hold numbers")
        if len(set(choices)) != len(choices):
            raise ConfigError(f"{where}.choices = {choices!r} has duplicates")
        return SearchParam(name, choices=tuple(choices))
    for key in ("low", "high"):
        if key not in table:
            raise ConfigError(f"{where}.{key} is missing (or give choices)")
        if not isinstance(table[key], (int, float)) or isinstance(table[key], bool):
            raise ConfigError(f"{where}.{key} = {table[key]!r} must be a number")
    low, high = float(table["low"]), float(table["high"])
    log = table.get("log", False)
    step = table.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log = {log!r} must be true or false")
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ConfigError(f"{where}: low = {low} must be below high = {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}.low = {low} must be > 0 with log = true")
    if step is not None:
        if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0:
            raise ConfigError(f"{where}.step = {step!r} must be a positive number")
        if log:
            raise ConfigError(f"{where}: step and log = true cannot be combined")
    p = SearchParam(name, low=low, high=high, log=log, step=None if step is None else float(step))
    if p.is_int:
        for key in ("low", "high", "step"):
            value = getattr(p, key)
            if value is not None and value != int(value):
                raise ConfigError(f"{where}.{key} = {value} must be a whole number ({name} is an integer)")
    return p


def _values(p: SearchParam) -> list:
    return list(p.choices) if p.choices is not None else [p.low, p.high]


def spec_from_mapping(data: dict, where: str = "sweep file") -> SweepSpec:
    """Parse and check a sweep mapping; every error names the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; allowed: {list(TABLES)}")
    for name in TABLES:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{where}: {name} must be a table")
    sweep = from_mapping(SweepSettings, data.get("sweep"), "sweep")
    if sweep.trials < 1:
        raise ConfigError(f"sweep.trials = {sweep.trials} must be >= 1")
    if sweep.heartbeat_interval < 1 or sweep.grace_period <= sweep.heartbeat_interval:
        raise ConfigError(f"sweep.heartbeat_interval = {sweep.heartbeat_interval} must be >= 1 and below "
                          f"sweep.grace_period = {sweep.grace_period}")
    if "model" not in data:
        raise ConfigError("model: missing; give at least model.preset (e.g. 'tiny')")
    shape = shape_from_config({k: data[k] for k in ("model", "param") if k in data}, "sweep")
    data_spec = from_mapping(DataSpec, data.get("data"), "data")
    train = from_mapping(TrainConfig, data.get("train"), "train")
    train.validate("train")
    hparams = hparams_from(data.get("hparams", {}))
    objective = from_mapping(ObjectiveSpec, data.get("objective"), "objective")
    if objective.last_evals < 1 or objective.seeds < 1:
        raise ConfigError("objective.last_evals and objective.seeds must be >= 1")
    n_evals = train.steps // train.eval_every + (train.steps % train.eval_every > 0)
    if objective.last_evals > n_evals:
        raise ConfigError(f"objective.last_evals = {objective.last_evals} exceeds the {n_evals} held-out "
                          f"evaluations a run makes (train.steps / train.eval_every)")
    sampler = from_mapping(SamplerSpec, data.get("sampler"), "sampler")
    if sampler.kind not in SAMPLERS:
        raise ConfigError(f"sampler.kind = {sampler.kind!r} is not allowed; choose one of {list(SAMPLERS)}")
    if sampler.kind == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as e:
            raise ConfigError("sampler.kind = 'cmaes' needs the 'cmaes' package (pip install cmaes)") from e
    pruner = from_mapping(PrunerSpec, data.get("pruner"), "pruner")
    if pruner.kind not in PRUNERS:
        raise ConfigError(f"pruner.kind = {pruner.kind!r} is not allowed; choose one of {list(PRUNERS)}")
    if pruner.reduction_factor < 2 or pruner.min_resource < 0:
        raise ConfigError("pruner.reduction_factor must be >= 2 and pruner.min_resource >= 0")

    search_table = data.get("search", {})
    if not search_table:
        raise ConfigError("search: no hyperparameter to search; add e.g. [search.lr] low = 1e-3, high = 1e-1, "
                          "log = true")
    allowed = HPARAM_FIELDS + TRAIN_SEARCHABLE
    search = []
    for name, table in search_table.items():
        if name not in allowed:
            raise ConfigError(f"search.{name} is not a searchable hyperparameter; allowed: {list(allowed)}")
        if name in data.get("hparams", {}):
            raise ConfigError(f"search.{name}: also fixed in hparams.{name}; keep one")
        p = _search_param(name, table, f"search.{name}")
        for value in _values(p):  # each end of the range must be a valid setting
            if p.is_int:
                dataclasses.replace(train, **{name: int(value)}).validate("train")
            else:
                from_mapping(HParams, {**dataclasses.asdict(hparams), name: value}, "search").validate("search")
        search.append(p)
    if sampler.kind == "grid":
        for p in search:
            if p.choices is None:
                raise ConfigError(f"search.{p.name}: sampler.kind = 'grid' needs choices for every parameter")
    return SweepSpec(sweep=sweep, shape=shape, data=data_spec, train=train, hparams=hparams,
                     objective=objective, sampler=sampler, pruner=pruner, search=tuple(search), raw=data)


def load_spec(path: str | Path) -> SweepSpec:
    data = load_toml(path)
    data.setdefault("sweep", {}).setdefault("name", Path(path).stem)
    return spec_from_mapping(data, Path(path).name)


def grid_size(spec: SweepSpec) -> int | None:
    if spec.sampler.kind != "grid":
        return None
    return math.prod(len(p.choices) for p in spec.search)


def resolved(spec: SweepSpec) -> dict:
    """The spec with every default filled in, for config.json (humans read this one)."""
    return {
        "sweep": dataclasses.asdict(spec.sweep),
        "model": dataclasses.asdict(spec.shape.model),
        "param": dataclasses.asdict(spec.shape.param),
        "preset": spec.preset,
        "data": dataclasses.asdict(spec.data),
        "train": dataclasses.asdict(spec.train),
        "hparams": dataclasses.asdict(spec.hparams),
        "objective": dataclasses.asdict(spec.objective),
        "sampler": dataclasses.asdict(spec.sampler),
        "pruner": dataclasses.asdict(spec.pruner),
        "search": {p.name: {k: v for k, v in dataclasses.asdict(p).items() if k != "name" and v is not None}
                   for p in spec.search},
    }
