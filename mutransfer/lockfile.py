"""The frozen-hyperparameter lock file: what a sweep hands to the full-scale run.

It holds the *base* hyperparameters (values at the base shape, scaled by the muP table at any
other shape), the parametrization and base shape they belong to, the proxy they were tuned on,
provenance, the fitted horizon/batch laws (mutransfer.laws), the warnings ``freeze`` raised, and a
content hash so an edited file is caught.

Every field is typed (``LockFile`` and the models below) and checked when the lock is read --
``plan`` and ``train`` read it through ``read_lock`` alone -- and when it is written, so a lock that
was written can be read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mutransfer.config import (
    Config,
    ConfigError,
    HParams,
    ModelConfig,
    NonNegFloat,
    NonNegInt,
    ParamConfig,
    Parametrization,
    PosInt,
    ProxyTrain,
    RunShape,
    SpecModel,
    parse,
)
from mutransfer.laws import Laws
from mutransfer.rundir import write_json

FORMAT = "mutransfer.hparams.lock/1"


# ---------------------------------------------------------------- provenance: what `freeze` records


class ObjectiveRecord(Config):
    metric: str
    value: float  # the best trial's objective (mean over seeds)
    seed_values: list[float] = Field(default_factory=list)
    seed_std: NonNegFloat = 0.0
    seeds: PosInt
    last_evals: PosInt


class ProxyRecord(Config):
    preset: str | None = None
    width: PosInt
    depth: PosInt
    parametrization: Parametrization


class DataRecord(Config):
    spec: str
    fingerprint: str | None = None


class SweepRecord(Config):
    definition_hash: str
    trials_budget: PosInt
    trials_complete: NonNegInt
    trials_total: NonNegInt
    sampler: str
    pruner: str


class CodeRecord(Config):
    package: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None


class Provenance(Config):
    """Where the values come from: a sweep's best trial (``freeze``), or a note for a lock written by hand."""

    # a lock written by hand (the shipped ones)
    source: str | None = None
    note: str | None = None
    reference: str | None = None
    base_shape: str | None = None
    # a lock written by `mutransfer freeze`
    study: str | None = None
    storage: str | None = None
    trial_number: NonNegInt | None = None
    objective: ObjectiveRecord | None = None
    proxy: ProxyRecord | None = None
    tokenizer: str | None = None
    data: DataRecord | None = None
    searched: list[str] = Field(default_factory=list)
    schedule_params: dict[str, float] = Field(default_factory=dict)  # searched schedule values (warmup)
    proxy_train: ProxyTrain | None = None  # the trials' budget: what the fitted laws scale from
    sweep: SweepRecord | None = None
    set_by_hand: list[str] = Field(default_factory=list)  # --set hparams.KEY=VALUE at freeze
    code: CodeRecord | None = None
    frozen_at: str | None = None


class LockWarning(Config):
    """Something ``freeze`` saw and wrote down: a value at its search range's edge, a law whose check
    did not pass. ``plan`` shows them; ``freeze --strict`` refuses to write a lock that has any."""

    kind: Literal["range_edge", "law_outcome"]
    field: str  # the searched parameter (range_edge) or laws.KIND (law_outcome)
    message: str


class LockFile(Config):
    """The whole file. ``proxy_model`` is typed on its own (ModelConfig, or SpecModel when it names a spec)."""

    format: Literal["mutransfer.hparams.lock/1"]
    hparams: HParams
    param: ParamConfig
    proxy_model: dict[str, Any]
    tokenizer: str
    provenance: Provenance = Field(default_factory=Provenance)
    laws: Laws = Field(default_factory=Laws)
    warnings: list[LockWarning] = Field(default_factory=list)
    content_hash: str


@dataclass(frozen=True)
class Lock:
    hparams: HParams
    param: ParamConfig
    proxy_model: ModelConfig | SpecModel
    tokenizer: str
    provenance: dict  # the record as written (checked against Provenance when read)
    content_hash: str
    laws: Laws  # fitted horizon / batch laws attached by freeze (none of either when absent)
    proxy_train: ProxyTrain | None = None  # provenance.proxy_train, typed: the budget the laws scale from
    warnings: tuple[LockWarning, ...] = ()


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def content_hash(body: dict) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()


def lock_body(hparams: HParams, param: ParamConfig, proxy_model: ModelConfig | SpecModel, provenance: dict,
              laws: dict | None = None, warnings: list[dict] | None = None) -> dict:
    body = {
        "format": FORMAT,
        "hparams": hparams.model_dump(),
        "param": param.model_dump(),
        "proxy_model": proxy_model.model_dump(),
        "tokenizer": proxy_model.tokenizer,
        "provenance": provenance,
    }
    if laws:
        body["laws"] = laws
    if warnings is not None:
        body["warnings"] = warnings
    return body


def write_lock(path: str | Path, hparams: HParams, param: ParamConfig, proxy_model: ModelConfig | SpecModel,
               provenance: dict, laws: dict | None = None, warnings: list[dict] | None = None) -> dict:
    """Write atomically; returns the written object. ``laws``: fitted horizon/batch laws (optional);
    ``warnings``: what freeze saw (a list, empty when none; absent: not checked). Checked as
    ``read_lock`` checks it, before anything is written."""
    body = lock_body(hparams, param, proxy_model, provenance, laws, warnings)
    obj = {**body, "content_hash": content_hash(body)}
    lock_from(json.loads(json.dumps(obj)), "lock")  # as read back (JSON: tuples become lists)
    write_json(path, obj)
    return obj


REQUIRED = ("format", "hparams", "param", "proxy_model", "tokenizer", "content_hash")


def read_lock(path: str | Path) -> Lock:
    """Read and check a lock: JSON object, format, content hash, and every field (typed, finite, in range).

    The one reading function of ``plan``, ``train`` and the Python API: a lock they accept, they read alike.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hparams lock file {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid JSON lock file: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a lock file is a JSON object with {list(REQUIRED)}; got a "
                          f"{type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise ConfigError(f"{path}: format = {obj.get('format')!r}; expected {FORMAT!r}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {missing}")
    body = {k: v for k, v in obj.items() if k != "content_hash"}
    if obj.get("content_hash") != content_hash(body):
        raise ConfigError(f"{path}: content_hash does not match the contents (the file was edited); "
                          "re-run `mutransfer freeze`")
    try:
        return lock_from(obj, "lock")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def lock_from(obj: dict, where: str = "lock") -> Lock:
    """A ``Lock`` from the file's object; ConfigError names the field (``lock.laws.horizon.beta``)."""
    record = parse(LockFile, obj, where)
    model_cls = SpecModel if "spec" in record.proxy_model else ModelConfig
    provenance = obj.get("provenance", {})
    return Lock(
        hparams=record.hparams,
        param=record.param,
        proxy_model=parse(model_cls, record.proxy_model, f"{where}.proxy_model"),
        tokenizer=record.tokenizer,
        provenance=provenance,
        content_hash=record.content_hash,
        laws=record.laws,
        proxy_train=record.provenance.proxy_train,
        warnings=tuple(record.warnings),
    )


def check_lock_matches(lock: Lock, target: RunShape) -> None:
    """The transfer is only valid for the same parametrization, base shape and tokenizer."""
    problems = []
    for field in ("parametrization", "d_base", "depth_base", "depth_alpha"):
        a, b = getattr(lock.param, field), getattr(target.param, field)
        if a != b:
            problems.append(f"param.{field}: lock has {a!r}, target has {b!r}")
    if lock.tokenizer != target.model.tokenizer:
        problems.append(f"model.tokenizer: lock has {lock.tokenizer!r}, target has {target.model.tokenizer!r}")
    if lock.proxy_model.head_dim != target.model.head_dim:
        problems.append(f"model.head_dim: lock has {lock.proxy_model.head_dim}, target has {target.model.head_dim}")
    if problems:
        raise ConfigError("the hparams lock file does not match the model being built: " + "; ".join(problems))
