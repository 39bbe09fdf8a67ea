"""A multi-stage run's config: its tables and the one validation that ``plan`` and ``train`` share.

A full-scale config (``[[stages]]``) is read by ``read_config`` (the TOML and its ``--set``
overrides) and checked by ``check_run`` before any compute, by ``mutransfer train`` (through
``full_scale.config.load_run_config``) and by ``mutransfer plan`` alike, so a config that one
accepts the other accepts and a refusal is the same one-line message from both. Only what needs
the machine is left to the trainer: whether the precision backend is installed here, and the
global batch against the real number of ranks (``plan`` checks it against ``--world-size``).

Tables: ``[model]`` and ``[param]`` (``mutransfer.plan.shape_from_config``), ``[[stages]]``,
``[optimizer]`` and ``[data]`` (``mutransfer.stages``), ``[train]`` (``FullTrain``),
``[parallel]``, ``[checkpoint]``, ``[metrics]``, ``[transfer]`` (``mutransfer.laws``),
``[residual]`` (``ResidualSettings``) and ``[tracking]`` (``mutransfer.tracking``: experiment
trackers fed besides the files; whether a chosen tracker's package is installed here is the
trainer's check, like the precision backend's). The base hyperparameters come from the lock file, never
from the config, except the residual multipliers that ``[residual]`` names: those are the run's
choice, and the lock's value beside them is shown, never dropped unseen.
"""

from __future__ import annotations

import copy
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
    updated,
)
from mutransfer.laws import TransferCorrection, corrected, correction
from mutransfer.stages import StagePlan, parse_stages, phase_where
from mutransfer.tracking.settings import TrackingSettings

TOP_LEVEL = ("model", "param", "stages", "optimizer", "data", "train", "parallel", "checkpoint", "metrics",
             "transfer", "residual", "tracking")


class FullTrain(TrainSettings):
    """``[train]`` of a full-scale run: the shared settings plus where the lock file is."""

    hparams: str | None = None
    """lock file, relative to the config file; --hparams wins"""
    eval_every: PosInt = 100
    """steps between held-out evaluations (also at every stage end)"""
    eval_batch_size: PosInt = 8
    """sequences per held-out batch"""


class ParallelSettings(Config):
    mode: Literal["fsdp", "ddp"] = "fsdp"
    """with more than one process: FSDP2 fully_shard, or DDP"""


class CheckpointSettings(Config):
    every: NonNegInt = 1000
    """steps between checkpoints; 0: only at stage ends and at the end"""
    keep: PosInt = 3
    """newest complete checkpoints kept"""
    at_stage_end: bool = True
    """also after each stage's last step (e.g. the pre-switch state)"""
    keep_stage_ends: bool = True
    """never prune those: branch points (e.g. the AdamW-only control)"""


class MetricsSettings(Config):
    peak_flops: PosFloat | None = None
    """per device, for MFU; default from the device table"""
    progress: bool = True
    """progress bar on stderr (rank 0)"""


class DataSettings(Config):
    mixture: list[dict] | None = None
    """default mixture for stages without their own (mutransfer.stages)"""
    val: str | None = None
    """held-out data; default: the first stage's first source"""
    cache_dir: str | None = None
    """where the built-in corpus is prepared"""


class ResidualSettings(Config):
    """``[residual]``: the attention and FFN residual-branch alphas (RECIPE section 2: separate
    multipliers, h += alpha / sqrt(L) x branch under ``xmodel``). A number is the run's value
    whatever the lock holds (the lock's is shown beside it); ``"lock"`` takes the lock's
    ``alpha_res_attn`` / ``alpha_res_ffn``, else its ``alpha_res``."""

    alpha_res_attn: PosFloat | Literal["lock"] = "lock"
    """the attention branch's alpha, or 'lock'"""
    alpha_res_ffn: PosFloat | Literal["lock"] = "lock"
    """the FFN branch's alpha, or 'lock'"""


def read_config(path: str | Path, overrides=()) -> dict:
    """The TOML after ``--set`` overrides; unknown tables and an ``[hparams]`` table refused."""
    raw = apply_overrides(copy.deepcopy(load_toml(path)), overrides, TOP_LEVEL)
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if "hparams" in unknown:
        raise ConfigError(f"{path}: [hparams] is not allowed in a training config; the base hyperparameters "
                          "come from the lock file (--hparams hparams.lock.json or train.hparams)")
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; allowed: {list(TOP_LEVEL)}")
    return raw


def is_staged(raw: dict) -> bool:
    """A multi-stage run's config (what ``read_config`` and ``check_run`` are for)."""
    return "stages" in raw


def section(cls, raw: dict, name: str):
    return parse(cls, raw.get(name, {}), name)


def lock_path_of(path: str | Path, train: FullTrain, hparams_path: str | None) -> str:
    """``--hparams``, else ``train.hparams`` relative to the config file; none is an error."""
    if hparams_path is not None:
        return hparams_path
    if train.hparams is not None:
        return str(Path(path).parent / train.hparams)
    raise ConfigError("no hyperparameters: pass --hparams hparams.lock.json (written by "
                      "`mutransfer freeze`, or the shipped full_scale/xmodel25_recipe.lock.json) or set "
                      "train.hparams in the config")


@dataclass(frozen=True)
class CheckedRun:
    """Every table of a staged config, parsed and checked, and the run's hyperparameters."""

    train: FullTrain
    parallel: ParallelSettings
    checkpoint: CheckpointSettings
    metrics: MetricsSettings
    data: DataSettings
    transfer: TransferCorrection
    residual: ResidualSettings
    tracking: TrackingSettings
    stages: StagePlan
    hparams: HParams  # the lock's, with [residual]'s multipliers and the fitted laws' LR when asked
    lr_correction: dict  # mutransfer.laws.correction: the factor on the base LR and its terms
    wd_correction: dict | None = None  # mutransfer.wd_law.weight_decay_at_target: the run's base lambda, how reached


def with_residual(hp: HParams, residual: ResidualSettings) -> HParams:
    """``hp`` with the multipliers ``[residual]`` names (``"lock"``: the lock's, unchanged)."""
    changes = {k: getattr(residual, k) for k in ("alpha_res_attn", "alpha_res_ffn") if getattr(residual, k) != "lock"}
    return updated(hp, "residual", **changes) if changes else hp


def main_batch(stages: StagePlan) -> int:
    """The global batch the run spends most of its tokens at (what a batch law is evaluated at)."""
    by_tokens: dict[int, int] = {}
    for _, _, _, phase in stages.phases():
        by_tokens[phase.global_batch] = by_tokens.get(phase.global_batch, 0) + phase.steps * phase.tokens_per_step
    return max(by_tokens, key=by_tokens.get)


def check_checkpointing_policies(shape: RunShape, train: TrainSettings, stages: StagePlan) -> None:
    """The run's default and every stage's and phase's own policy against the precision and the model."""
    from mutransfer.precision import check_checkpointing

    check_checkpointing(train.precision, train.activation_checkpointing)
    for i, stage in enumerate(stages.stages):
        own = [(f"stages[{i}] ({stage.name}).activation_checkpointing", stage.checkpointing)]
        own += [(f"{phase_where(i, stage, j)}.activation_checkpointing", phase.checkpointing)
                for j, phase in enumerate(stage.phases)]
        for where, policy in own:
            if policy is None:
                continue
            check_checkpointing(train.precision, policy, where)
            if isinstance(shape.model, SpecModel) and policy != "none":
                raise ConfigError(f"{where} = {policy!r}: a model spec's model ({shape.model.spec}) "
                                  "runs without activation checkpointing; use 'none'")


def check_fused_muon(shape: RunShape, stages: StagePlan) -> None:
    """Fused Muon needs a model spec that names its fused sets: refused here, not at the switch."""
    from mutransfer.specs import spec_of

    param = shape.param.parametrization
    if stages.switch_step is None or not stages.switch.fuse_for(param) or spec_of(shape.model).fuse_key is not None:
        return
    model = shape.model.spec if isinstance(shape.model, SpecModel) else "the built-in Transformer"
    raise ConfigError(f"optimizer.muon_fuse = true ({stages.switch.fuse_source(param)}): the model spec of {model} "
                      "names no fused sets (ModelSpec.fuse_key) for Muon to orthogonalise as one matrix; "
                      "set optimizer.muon_fuse = false")


def weight_decay_of(lock, shape: RunShape, stages: StagePlan, hp: HParams, use: TransferCorrection) -> dict:
    """The base weight decay of the run (``mutransfer.wd_law.weight_decay_at_target``): the lock's, or with
    ``transfer.weight_decay = "fitted"`` the Power Lines law's at the target's parameters, tokens and
    steps, at the run's base LR (after any LR law)."""
    from mutransfer.plan import count_params
    from mutransfer.wd_law import weight_decay_at_target

    params = count_params(shape)["params_total"] if lock.laws.weight_decay is not None else 1
    return weight_decay_at_target(lock.laws.weight_decay, use.weight_decay, hp.weight_decay, hp.lr, params,
                                  stages.total_tokens, stages.total_steps)


def check_run(raw: dict, shape: RunShape, lock, hp: HParams | None = None) -> CheckedRun:
    """The one validation of a staged config against its target and lock (``plan`` and ``train``).

    ``hp``: the base hyperparameters (default: the lock's; ``plan`` passes its ``--lr`` what-ifs).
    """
    from mutransfer.precision import check_dims
    from mutransfer.tokenizer import check_model_vocab

    if isinstance(raw.get("metrics"), dict) and "tensorboard" in raw["metrics"]:
        raise ConfigError("metrics.tensorboard: replaced by the [tracking] table; use tracking.backends = "
                          '["tensorboard"] (or --track tensorboard)')
    tables = {name: section(cls, raw, name) for name, cls in (
        ("train", FullTrain), ("parallel", ParallelSettings), ("checkpoint", CheckpointSettings),
        ("metrics", MetricsSettings), ("data", DataSettings), ("transfer", TransferCorrection),
        ("residual", ResidualSettings), ("tracking", TrackingSettings))}
    train = tables["train"]
    check_model_vocab(shape.model)
    check_dims(shape.model, train.precision)
    base = with_residual(hp or lock.hparams, tables["residual"])
    stages = parse_stages(raw, shape, base)
    fix = correction(lock.laws, lock.proxy_train, stages.total_tokens, main_batch(stages), tables["transfer"])
    run_hp = corrected(base, fix["factor"])
    if fix["factor"] != 1.0:  # the stage plan's LR unit (the hidden peak) follows the corrected LR
        stages = parse_stages(raw, shape, run_hp)
    wd = weight_decay_of(lock, shape, stages, run_hp, tables["transfer"])
    if wd["applied"]:
        run_hp = updated(run_hp, "transfer.weight_decay", weight_decay=wd["weight_decay"])
        stages = parse_stages(raw, shape, run_hp)
    check_checkpointing_policies(shape, train, stages)
    check_fused_muon(shape, stages)
    if train.eval_seq_len is not None and train.eval_seq_len > shape.model.max_seq_len:
        raise ConfigError(f"train.eval_seq_len = {train.eval_seq_len} exceeds model.max_seq_len = "
                          f"{shape.model.max_seq_len}")
    return CheckedRun(**tables, stages=stages, hparams=run_hp, lr_correction=fix, wd_correction=wd)
