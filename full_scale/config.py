"""The full-scale run config: a TOML file plus ``--set key=value`` overrides, checked before compute.

Tables: ``[model]`` and ``[param]`` (as ``mutransfer plan`` reads them), ``[[stages]]``,
``[optimizer]`` and ``[data]`` (mutransfer.stages), and the trainer's own ``[train]``,
``[parallel]``, ``[checkpoint]``, ``[metrics]`` below. Hyperparameters never come from the config:
they come from the lock file (``--hparams`` or ``train.hparams``), checked against the target.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mutransfer.config import ConfigError, HParams, RunShape, from_mapping, load_toml
from mutransfer.lockfile import Lock, check_lock_matches, read_lock
from mutransfer.plan import shape_from_config
from mutransfer.stages import StagePlan, parse_stages

PARALLEL_MODES = ("fsdp", "ddp")
DEVICES = ("auto", "cpu", "cuda")
TOP_LEVEL = ("model", "param", "stages", "optimizer", "data", "train", "parallel", "checkpoint", "metrics")
# Tables that do not change the trajectory: a run may resume with them changed.
NOT_TRAJECTORY = ("checkpoint", "metrics")


@dataclass(frozen=True)
class TrainSettings:
    precision: str = "fp32"  # mutransfer.precision.PRECISIONS
    device: str = "auto"  # auto: cuda when available
    threads: int | None = None  # CPU intra-op threads (torch.set_num_threads); default: torch's choice
    seed: int = 0  # model initialisation
    data_seed: int = 0  # batch draws
    hparams: str | None = None  # lock file, relative to the config file; --hparams wins
    eval_every: int = 100  # steps between held-out evaluations (also at every stage end)
    eval_batches: int = 4
    eval_batch_size: int = 8
    eval_seq_len: int | None = None  # default: the first stage's sequence length


@dataclass(frozen=True)
class ParallelSettings:
    mode: str = "fsdp"  # with more than one process: fsdp (FSDP2 fully_shard) or ddp


@dataclass(frozen=True)
class CheckpointSettings:
    every: int = 1000  # steps between checkpoints; 0: only at stage ends and at the end
    keep: int = 3  # newest complete checkpoints kept
    at_stage_end: bool = True  # also after each stage's last step (e.g. the pre-switch state)
    keep_stage_ends: bool = True  # never prune those: branch points (e.g. the AdamW-only control)


@dataclass(frozen=True)
class MetricsSettings:
    peak_flops: float | None = None  # per device, for MFU; default from the device table
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True  # progress bar on stderr (rank 0)


@dataclass(frozen=True)
class DataSettings:
    mixture: list | None = None  # default mixture for stages without their own
    val: str | None = None  # held-out data; default: the first stage's first source
    cache_dir: str | None = None  # where the built-in corpus is prepared


@dataclass(frozen=True)
class RunConfig:
    raw: dict  # the TOML after overrides: what config.json records
    path: str
    overrides: tuple[str, ...]
    shape: RunShape
    lock: Lock
    lock_path: str
    stages: StagePlan
    train: TrainSettings
    parallel: ParallelSettings
    checkpoint: CheckpointSettings
    metrics: MetricsSettings
    data: DataSettings

    @property
    def hp(self) -> HParams:
        return self.lock.hparams

    @property
    def eval_seq_len(self) -> int:
        return self.train.eval_seq_len or self.stages.stages[0].phases[0].seq_len

    @property
    def val_spec(self) -> str:
        return self.data.val or self.stages.stages[0].mixture[0].data

    def trajectory_fingerprint(self) -> str:
        """Hash of everything that decides the run's numbers; a resume must match it."""
        body = {k: v for k, v in self.raw.items() if k not in NOT_TRAJECTORY}
        body["lock_content_hash"] = self.lock.content_hash
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def to_json(self) -> dict:
        return {
            "config_path": self.path,
            "overrides": list(self.overrides),
            "config": self.raw,
            "hparams_lock": {"path": self.lock_path, "content_hash": self.lock.content_hash,
                             "provenance": self.lock.provenance},
            "hparams": dataclasses.asdict(self.hp),
            "model": dataclasses.asdict(self.shape.model),
            "param": dataclasses.asdict(self.shape.param),
            "train": dataclasses.asdict(self.train),
            "parallel": dataclasses.asdict(self.parallel),
            "checkpoint": dataclasses.asdict(self.checkpoint),
            "metrics": dataclasses.asdict(self.metrics),
            "data": dataclasses.asdict(self.data) | {"val": self.val_spec},
            "trajectory_fingerprint": self.trajectory_fingerprint(),
        }


def _parse_value(text: str):
    """A TOML value (``false``, ``3``, ``1e-5``, ``"x"``, ``[1, 2]``); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """``a.b.c=value`` into ``raw``; a list of tables is indexed by position or by its ``name``."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optimizer.switch=false")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in TOP_LEVEL:
        raise ConfigError(f"--set {key}: unknown table {parts[0]!r}; allowed: {list(TOP_LEVEL)}")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = _parse_value(text)
    else:
        node[last] = _parse_value(text)


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise ConfigError(f"--set: {where} names no entry; use an index < {len(items)} or a name from {names}")


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} = {value!r} is not allowed; choose one of {list(allowed)}")


def _section(cls, raw: dict, name: str):
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table")
    return from_mapping(cls, value, name)


def load_run_config(path: str, overrides: list[str] | tuple[str, ...] = (), hparams_path: str | None = None
                    ) -> RunConfig:
    """Read, override, validate; read the lock and check it against the target. No compute."""
    from mutransfer.precision import PRECISIONS, check_dims

    raw = copy.deepcopy(load_toml(path))
    for assignment in overrides:
        apply_override(raw, assignment)
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if "hparams" in unknown:
        raise ConfigError(f"{path}: [hparams] is not allowed in a training config; the base hyperparameters "
                          "come from the lock file (--hparams hparams.lock.json or train.hparams)")
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; allowed: {list(TOP_LEVEL)}")
    shape = shape_from_config(raw, Path(path).name)
    train = _section(TrainSettings, raw, "train")
    _choice("train.precision", train.precision, PRECISIONS)
    _choice("train.device", train.device, DEVICES)
    if train.threads is not None and train.threads <= 0:
        raise ConfigError(f"train.threads = {train.threads} must be positive")
    for name in ("eval_every", "eval_batches", "eval_batch_size"):
        if getattr(train, name) <= 0:
            raise ConfigError(f"train.{name} = {getattr(train, name)} must be positive")
    check_dims(shape.model, train.precision)
    parallel = _section(ParallelSettings, raw, "parallel")
    _choice("parallel.mode", parallel.mode, PARALLEL_MODES)
    checkpoint = _section(CheckpointSettings, raw, "checkpoint")
    if checkpoint.every < 0 or checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.every = {checkpoint.every} must be >= 0 and checkpoint.keep = "
                          f"{checkpoint.keep} >= 1")
    metrics = _section(MetricsSettings, raw, "metrics")
    data = _section(DataSettings, raw, "data")

    lock_path = hparams_path
    if lock_path is None and train.hparams is not None:
        lock_path = str(Path(path).parent / train.hparams)
    if lock_path is None:
        raise ConfigError("no hyperparameters: pass --hparams hparams.lock.json (written by "
                          "`mutransfer freeze`) or set train.hparams in the config")
    lock = read_lock(lock_path)
    check_lock_matches(lock, shape)
    stages = parse_stages(raw, shape, lock.hparams)
    if train.eval_seq_len is not None and train.eval_seq_len > shape.model.max_seq_len:
        raise ConfigError(f"train.eval_seq_len = {train.eval_seq_len} exceeds model.max_seq_len = "
                          f"{shape.model.max_seq_len}")
    return RunConfig(raw=raw, path=str(path), overrides=tuple(overrides), shape=shape, lock=lock,
                     lock_path=str(lock_path), stages=stages, train=train, parallel=parallel,
                     checkpoint=checkpoint, metrics=metrics, data=data)
