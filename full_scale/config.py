"""The full-scale run config: a TOML file plus ``--set key=value`` overrides, checked before compute.

Tables: ``[model]`` and ``[param]`` (as ``mutransfer plan`` reads them; ``[param]`` is optional and
then comes from the lock file), ``[[stages]]``, ``[optimizer]`` and ``[data]``
(mutransfer.stages), ``[train]`` (mutransfer.config.TrainSettings, the same table a proxy run
has, plus the lock path), and the trainer's own ``[parallel]``, ``[checkpoint]``, ``[metrics]``
below, and ``[tracking]`` (mutransfer.tracking: experiment trackers fed besides the files; ``--track``
overrides its backends). Hyperparameters never come from the config: they come from the lock file (``--hparams`` or
``train.hparams``), checked against the target.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mutransfer.config import (
    Config,
    ConfigError,
    HParams,
    NonNegInt,
    PosFloat,
    PosInt,
    RunShape,
    SpecModel,
    TrainSettings,
    apply_overrides,
    load_toml,
    parse,
)
from mutransfer.laws import TransferCorrection, corrected, correction
from mutransfer.lockfile import Lock, check_lock_matches, read_lock
from mutransfer.plan import shape_from_config
from mutransfer.stages import StagePlan, parse_stages
from mutransfer.tracking import TrackingSettings, check_installed

TOP_LEVEL = ("model", "param", "stages", "optimizer", "data", "train", "parallel", "checkpoint", "metrics",
             "transfer", "tracking")
# Tables that do not change the trajectory: a run may resume with them changed.
NOT_TRAJECTORY = ("checkpoint", "metrics", "tracking")


class FullTrain(TrainSettings):
    """``[train]`` of a full-scale run: the shared settings plus where the lock file is."""

    hparams: str | None = None  # lock file, relative to the config file; --hparams wins
    eval_every: PosInt = 100  # steps between held-out evaluations (also at every stage end)
    eval_batch_size: PosInt = 8


class ParallelSettings(Config):
    mode: Literal["fsdp", "ddp"] = "fsdp"  # with more than one process: FSDP2 fully_shard, or DDP


class CheckpointSettings(Config):
    every: NonNegInt = 1000  # steps between checkpoints; 0: only at stage ends and at the end
    keep: PosInt = 3  # newest complete checkpoints kept
    at_stage_end: bool = True  # also after each stage's last step (e.g. the pre-switch state)
    keep_stage_ends: bool = True  # never prune those: branch points (e.g. the AdamW-only control)


class MetricsSettings(Config):
    peak_flops: PosFloat | None = None  # per device, for MFU; default from the device table
    progress: bool = True  # progress bar on stderr (rank 0)


class DataSettings(Config):
    mixture: list[dict] | None = None  # default mixture for stages without their own (mutransfer.stages)
    val: str | None = None  # held-out data; default: the first stage's first source
    cache_dir: str | None = None  # where the built-in corpus is prepared


# The full-scale config's own tables, for ``mutransfer schema`` (entry point ``mutransfer.configs``).
CONFIG_TABLES = ("Full-scale config (mutransfer train)",
                 [("[train]", FullTrain), ("[parallel]", ParallelSettings), ("[checkpoint]", CheckpointSettings),
                  ("[metrics]", MetricsSettings), ("[data]", DataSettings), ("[transfer]", TransferCorrection)])


@dataclass(frozen=True)
class RunConfig:
    raw: dict  # the TOML after overrides: what config.json records
    path: str
    overrides: tuple[str, ...]
    shape: RunShape
    lock: Lock
    lock_path: str
    stages: StagePlan
    train: FullTrain
    parallel: ParallelSettings
    checkpoint: CheckpointSettings
    metrics: MetricsSettings
    data: DataSettings
    transfer: TransferCorrection
    tracking: TrackingSettings
    lr_correction: dict  # mutransfer.laws.correction: the factor on the base LR and its terms

    @property
    def hp(self) -> HParams:
        """The lock's base hyperparameters, with the LR corrected by the fitted laws when asked for."""
        return corrected(self.lock.hparams, self.lr_correction["factor"])

    @property
    def eval_seq_len(self) -> int:
        return self.train.eval_seq_len or self.stages.stages[0].phases[0].seq_len

    @property
    def val_spec(self) -> str:
        return self.data.val or self.stages.stages[0].mixture[0].data

    def trajectory_fingerprint(self) -> str:
        """Hash of everything that decides the run's numbers; a resume must match it."""
        body = {k: v for k, v in self.raw.items() if k not in NOT_TRAJECTORY}
        body["param"] = self.shape.param.model_dump()  # from the lock when the config has none
        body["lock_content_hash"] = self.lock.content_hash
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def to_json(self) -> dict:
        return {
            "config_path": self.path,
            "overrides": list(self.overrides),
            "config": self.raw,
            "hparams_lock": {"path": self.lock_path, "content_hash": self.lock.content_hash,
                             "provenance": self.lock.provenance},
            "hparams": self.hp.model_dump(),
            "lr_correction": self.lr_correction,
            "model": self.shape.model.model_dump(),
            "param": self.shape.param.model_dump(),
            "param_from_lock": "param" not in self.raw,
            "train": self.train.model_dump(),
            "parallel": self.parallel.model_dump(),
            "checkpoint": self.checkpoint.model_dump(),
            "metrics": self.metrics.model_dump(),
            "tracking": self.tracking.model_dump(),
            "data": self.data.model_dump() | {"val": self.val_spec},
            "optimizer": self.stages.switch.model_dump() | {
                "restart_resolved": self.stages.switch.restart_for(self.shape.param.parametrization),
                "muon_fuse_resolved": self.stages.switch.fuse_for(self.shape.param.parametrization)},
            "trajectory_fingerprint": self.trajectory_fingerprint(),
        }


def _section(cls, raw: dict, name: str):
    return parse(cls, raw.get(name, {}), name)


def lock_path_of(path: str, train: FullTrain, hparams_path: str | None) -> str:
    if hparams_path is not None:
        return hparams_path
    if train.hparams is not None:
        return str(Path(path).parent / train.hparams)
    raise ConfigError("no hyperparameters: pass --hparams hparams.lock.json (written by "
                      "`mutransfer freeze`, or the shipped full_scale/xmodel25_recipe.lock.json) or set "
                      "train.hparams in the config")


def load_run_config(path: str, overrides: list[str] | tuple[str, ...] = (), hparams_path: str | None = None
                    ) -> RunConfig:
    """Read, override, validate; read the lock and check it against the target. No compute."""
    from mutransfer.precision import check_checkpointing, check_dims

    raw = apply_overrides(copy.deepcopy(load_toml(path)), overrides, TOP_LEVEL)
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if "hparams" in unknown:
        raise ConfigError(f"{path}: [hparams] is not allowed in a training config; the base hyperparameters "
                          "come from the lock file (--hparams hparams.lock.json or train.hparams)")
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; allowed: {list(TOP_LEVEL)}")
    train = _section(FullTrain, raw, "train")
    parallel = _section(ParallelSettings, raw, "parallel")
    checkpoint = _section(CheckpointSettings, raw, "checkpoint")
    if isinstance(raw.get("metrics"), dict) and "tensorboard" in raw["metrics"]:
        raise ConfigError("metrics.tensorboard: replaced by the [tracking] table; use tracking.backends = "
                          '["tensorboard"] (or --track tensorboard)')
    metrics = _section(MetricsSettings, raw, "metrics")
    data = _section(DataSettings, raw, "data")
    transfer = _section(TransferCorrection, raw, "transfer")
    tracking = _section(TrackingSettings, raw, "tracking")
    check_installed(tracking)
    lock_path = lock_path_of(path, train, hparams_path)
    lock = read_lock(lock_path)
    shape = shape_from_config(raw, Path(path).name, param_default=lock.param)
    check_lock_matches(lock, shape)
    check_dims(shape.model, train.precision)
    stages = parse_stages(raw, shape, lock.hparams)
    fix = correction(lock.laws, lock.provenance, stages.total_tokens, main_batch(stages), transfer)
    if fix["factor"] != 1.0:  # the stage plan's LR unit (the hidden peak) follows the corrected LR
        stages = parse_stages(raw, shape, corrected(lock.hparams, fix["factor"]))
    check_checkpointing(train.precision, train.activation_checkpointing)
    for i, stage in enumerate(stages.stages):
        if stage.checkpointing is not None:
            where = f"stages[{i}] ({stage.name}).activation_checkpointing"
            check_checkpointing(train.precision, stage.checkpointing, where)
            if isinstance(shape.model, SpecModel) and stage.checkpointing != "none":
                raise ConfigError(f"{where} = {stage.checkpointing!r}: a model spec's model ({shape.model.spec}) "
                                  "runs without activation checkpointing; use 'none'")
    if train.eval_seq_len is not None and train.eval_seq_len > shape.model.max_seq_len:
        raise ConfigError(f"train.eval_seq_len = {train.eval_seq_len} exceeds model.max_seq_len = "
                          f"{shape.model.max_seq_len}")
    return RunConfig(raw=raw, path=str(path), overrides=tuple(overrides), shape=shape, lock=lock,
                     lock_path=str(lock_path), stages=stages, train=train, parallel=parallel,
                     checkpoint=checkpoint, metrics=metrics, data=data, transfer=transfer, tracking=tracking,
                     lr_correction=fix)


def main_batch(stages: StagePlan) -> int:
    """The global batch the run spends most of its tokens at (what a batch law is evaluated at)."""
    by_tokens: dict[int, int] = {}
    for _, _, _, phase in stages.phases():
        by_tokens[phase.global_batch] = by_tokens.get(phase.global_batch, 0) + phase.steps * phase.tokens_per_step
    return max(by_tokens, key=by_tokens.get)
