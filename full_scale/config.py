"""The full-scale run config: a TOML file plus ``--set key=value`` overrides, checked before compute.

The tables and their one validation are ``mutransfer.run_config``'s (``mutransfer plan`` runs the
same checks, so a config one accepts the other accepts): ``[model]`` and ``[param]`` (as ``plan``
reads them; ``[param]`` is optional and then comes from the lock file), ``[[stages]]``,
``[optimizer]`` and ``[data]`` (mutransfer.stages), ``[train]`` (``FullTrain``: the proxy run's
settings plus the lock path), ``[parallel]``, ``[checkpoint]``, ``[metrics]``, ``[transfer]``,
``[residual]`` and ``[tracking]`` (mutransfer.tracking: experiment trackers fed besides the files;
``--track`` overrides its backends). Hyperparameters never come from the config: they come from
the lock file (``--hparams`` or ``train.hparams``), checked against the target; ``[residual]``
names the residual multipliers the run keeps whatever the lock (the recipe's choice, shown beside
the lock's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from mutransfer.config import HParams, RunShape
from mutransfer.laws import TransferCorrection
from mutransfer.lockfile import Lock, check_lock_matches, read_lock
from mutransfer.plan import shape_from_config
from mutransfer.run_config import (
    TOP_LEVEL,
    CheckedRun,
    CheckpointSettings,
    DataSettings,
    FullTrain,
    MetricsSettings,
    ParallelSettings,
    ResidualSettings,
    check_run,
    lock_path_of,
    main_batch,
    read_config,
    section,
)
from mutransfer.tracking import check_installed

__all__ = ["TOP_LEVEL", "NOT_TRAJECTORY", "CONFIG_TABLES", "RunConfig", "load_run_config", "lock_path_of",
           "main_batch", "FullTrain", "ParallelSettings", "CheckpointSettings", "MetricsSettings", "DataSettings",
           "ResidualSettings"]

# Tables that do not change the trajectory: a run may resume with them changed.
NOT_TRAJECTORY = ("checkpoint", "metrics", "tracking")

# The full-scale config's own tables, for ``mutransfer schema`` (entry point ``mutransfer.configs``).
CONFIG_TABLES = ("Full-scale config (mutransfer train)",
                 [("[train]", FullTrain), ("[parallel]", ParallelSettings), ("[checkpoint]", CheckpointSettings),
                  ("[metrics]", MetricsSettings), ("[data]", DataSettings), ("[transfer]", TransferCorrection),
                  ("[residual]", ResidualSettings)])


@dataclass(frozen=True, kw_only=True)
class RunConfig(CheckedRun):
    """A checked run (every table, the stage plan, the run's hyperparameters) with where it came from."""

    raw: dict  # the TOML after overrides: what config.json records
    path: str
    overrides: tuple[str, ...]
    shape: RunShape
    lock: Lock
    lock_path: str

    @property
    def hp(self) -> HParams:
        """The run's hyperparameters: the lock's base values, [residual]'s multipliers, the corrected LR."""
        return self.hparams

    def recipe_choices(self) -> dict:
        """The run's choices beyond the base hyperparameters, each with where it came from."""
        from mutransfer.choices import recipe_choices

        return recipe_choices(self.shape, self.stages, self.residual, self.lock.hparams, self.hparams)

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
                             "provenance": self.lock.provenance,
                             "warnings": [w.model_dump() for w in self.lock.warnings]},
            "hparams": self.hp.model_dump(),
            "lr_correction": self.lr_correction,
            "wd_correction": self.wd_correction,
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
            "residual": self.residual.model_dump(),
            "recipe_choices": self.recipe_choices(),
            "trajectory_fingerprint": self.trajectory_fingerprint(),
        }


def load_run_config(path: str, overrides: list[str] | tuple[str, ...] = (), hparams_path: str | None = None
                    ) -> RunConfig:
    """Read, override, validate; read the lock and check it against the target. No compute."""
    raw = read_config(path, overrides)
    train = section(FullTrain, raw, "train")
    lock_path = lock_path_of(path, train, hparams_path)
    lock = read_lock(lock_path)
    shape = shape_from_config(raw, Path(path).name, param_default=lock.param)
    check_lock_matches(lock, shape)
    run = check_run(raw, shape, lock)
    check_installed(run.tracking)  # this machine's: plan leaves it to the trainer, like the precision backend
    return RunConfig(raw=raw, path=str(path), overrides=tuple(overrides), shape=shape, lock=lock,
                     lock_path=str(lock_path), **{f.name: getattr(run, f.name) for f in fields(run)})
