"""The Python API for a user's own model: build it under muP, get its optimizer groups, check it.

Everything here goes through a ``ModelSpec`` (``mutransfer.spec``); ``docs/any_model.md`` shows a
whole session with a nanoGPT-style GPT. The numbers come from the one table
(``mutransfer.parametrization``), so a spec model is treated exactly like the built-in Transformer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mutransfer.config import ConfigError, HParams, ParamConfig, parse
from mutransfer.spec import ModelSpec


def param_config(spec: ModelSpec, parametrization: str = "mup", d_base: int | None = None,
                 depth_base: int | None = None, depth_alpha: float = 0.5) -> ParamConfig:
    """The rules' base shape: the spec's own width and depth unless given."""
    return parse(ParamConfig, {"parametrization": parametrization, "d_base": d_base or spec.width,
                               "depth_base": depth_base or spec.depth, "depth_alpha": depth_alpha}, "param")


def _hparams(hparams: HParams | dict | None) -> HParams:
    if isinstance(hparams, HParams):
        return hparams
    return parse(HParams, hparams or {}, "hparams")


def make_model(spec: ModelSpec, width: int | None = None, depth: int | None = None,
               hparams: HParams | dict | None = None, parametrization: str = "mup", *,
               param: ParamConfig | None = None, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Module:
    """``spec``'s model at ``width`` and ``depth`` (default: the spec's), initialised by the muP table with
    its forward multipliers in place. ``param`` overrides ``parametrization`` and the base shape."""
    from mutransfer.build import build as build_spec

    param = param or param_config(spec, parametrization)
    return build_spec(spec, width or spec.width, depth or spec.depth, param, _hparams(hparams), device, seed)


def width_and_depth(spec: ModelSpec, model: nn.Module) -> tuple[int, int]:
    """A built model's width (its embedding's last dimension) and depth (its number of blocks)."""
    from mutransfer.parametrization import Role

    roles = spec.roles.check([n for n, _ in model.named_parameters()], where=f"model spec {spec.name!r} roles")
    widths = {p.shape[-1] for n, p in model.named_parameters() if roles[n] == Role.EMBEDDING}
    if len(widths) != 1:
        raise ConfigError(f"model spec {spec.name!r}: cannot read the width from the embedding (found {widths}); "
                          "pass width= and depth=")
    return widths.pop(), len(spec.block_names(model)) or spec.depth


def param_groups(spec: ModelSpec, model: nn.Module, hparams: HParams | dict | None = None, optimizer: str = "adamw",
                 parametrization: str = "mup", *, width: int | None = None, depth: int | None = None,
                 param: ParamConfig | None = None) -> list[dict]:
    """Parameter groups for the user's own ``torch.optim.AdamW`` (``optimizer="adamw"``), or, with
    ``optimizer="muon"``, a dict ``{"adamw": [...], "muon": [...]}`` for ``torch.optim.AdamW`` and
    ``torch.optim.Muon``. Each group has ``lr`` (and ``base_lr``, the peak an LR schedule scales),
    ``weight_decay``, ``eps``, ``role`` and ``names``. Width and depth are read from the model unless given.
    """
    from mutransfer.parametrization import param_groups as groups_of

    if width is None or depth is None:
        read_width, read_depth = width_and_depth(spec, model)
        width, depth = width or read_width, depth or read_depth
    param = param or param_config(spec, parametrization)
    groups = groups_of(model, spec.shape(width, depth), param, _hparams(hparams), optimizer, roles=spec.roles,
                       fuse_key=spec.fuse_key)
    return groups["adamw"] if optimizer == "adamw" else groups


@dataclass
class CoordResult:
    """What ``coord_check`` found: the verdict (as ``verdict.json``), the records, and the exit status."""

    verdict: dict
    records: object  # pandas.DataFrame, one row per (width, seed, step, module, statistic)
    out: Path | None

    @property
    def passed(self) -> bool:
        return bool(self.verdict["passed"])

    @property
    def exit_status(self) -> int:
        return 0 if self.passed else 1

    def summary(self) -> str:
        return "\n".join(self.verdict["summary"])


def coord_check(spec: ModelSpec, widths: list[int], parametrization: str = "mup", *, optimizer: str = "adamw",
                depth: int | None = None, steps: int = 10, seeds: int = 3, lr: float | None = None,
                hparams: HParams | dict | None = None, batches=None, batch_size: int = 4, seq_len: int = 64,
                threshold: float = 0.1, update_tokens: int = 64, device: str = "cpu", out: str | Path | None = None,
                progress: bool | Callable[[str], None] = True) -> CoordResult:
    """The coordinate check of ``spec`` across ``widths``: train each width ``seeds`` times for ``steps``
    steps on one batch and judge the slopes of every tapped size against width (docs/coord_check.md).

    ``batches``: a list of (x, y) token batches, one per step (default: one batch of the built-in
    byte-level corpus, repeated). With ``out`` the records, config and verdict are written there
    (``coord.parquet``, ``config.json``, ``verdict.json``); ``analysis.coord.draw(out)`` draws them.
    ``progress``: a line per trained run on stderr (runs done / total, elapsed seconds), a function
    to receive the lines instead, or False.
    """
    import pandas as pd

    from mutransfer.coord import spec_records
    from mutransfer.coord_config import DEFAULT_LR
    from mutransfer.coord_verdict import combine
    from mutransfer.coord_verdict import verdict as judge_records
    from mutransfer.infer_roles import infinite_dims
    from mutransfer.rundir import write_json

    if len(set(widths)) < 2:
        raise ConfigError(f"widths = {list(widths)}: need at least two distinct widths to fit a slope")
    depth = depth or spec.depth
    infinite_dims(spec.build, min(widths), depth)  # a build that ignores the width cannot be checked
    lr = lr if lr is not None else DEFAULT_LR[optimizer]
    hp = _hparams({**(_hparams(hparams).model_dump() if hparams is not None else {}), "lr": lr, "grad_clip": 0.0})
    param = param_config(spec, parametrization)
    if batches is None:
        from mutransfer.data.builtin import builtin_dataset

        if spec.vocab_size is not None and spec.vocab_size < 256:
            raise ConfigError(f"model spec {spec.name!r}: vocab_size = {spec.vocab_size} is smaller than the built-in "
                              "byte-level corpus's 256 tokens; pass batches=")
        batches = [builtin_dataset(tokenizer="byte").batch("train", 0, 0, batch_size, seq_len)] * steps
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    if progress is True:
        start = time.perf_counter()

        def progress(message: str) -> None:
            print(f"[coord-check {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)
    records = spec_records(spec, [(w, depth) for w in sorted(set(widths))], param, hp, batches, optimizer=optimizer,
                           seeds=seeds, device=device, update_tokens=update_tokens, progress=progress or None)
    df = pd.DataFrame.from_records(records)
    v = judge_records(df, parametrization, threshold)
    config = {"spec": spec.name, "widths": sorted(set(widths)), "depth": depth, "steps": len(batches),
              "seeds": seeds, "lr": lr, "optimizer": optimizer, "param": parametrization, "precision": "fp32",
              "threshold": threshold, "statistic": "l1", "hparams": hp.model_dump()}
    result = combine([v], config)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / "coord.parquet", index=False)
        write_json(out / "config.json", config)
        write_json(out / "verdict.json", result)
    return CoordResult(verdict=result, records=df, out=out)


def apply_lock(spec: ModelSpec, lock, width: int | None = None, depth: int | None = None, optimizer: str = "adamw",
               *, device: str | torch.device = "cpu", seed: int | None = 0) -> tuple[nn.Module, list[dict] | dict]:
    """A frozen lock (``mutransfer freeze``'s file, or a read ``Lock``) on ``spec``'s model at ``width`` and
    ``depth``, for the user's own loop: ``(model, groups)`` -- the model initialised by the table from the
    lock's base values and parametrization, and its optimizer groups (``param_groups``). Each group's
    ``base_lr`` is its peak: a schedule sets ``lr = base_lr * factor(step)`` (``mutransfer.schedule.wsd``).

    The transfer holds for the lock's own family only: a lock frozen on another model (another spec
    target, or the built-in Transformer), or a head dim that differs, is an error naming the field.
    """
    from mutransfer.config import SpecModel
    from mutransfer.lockfile import read_lock

    if not hasattr(lock, "hparams"):
        lock = read_lock(lock)
    width, depth = width or spec.width, depth or spec.depth
    proxy = lock.proxy_model
    problems = []
    if not isinstance(proxy, SpecModel):
        problems.append("lock.proxy_model: frozen on the built-in Transformer, not on a model spec")
    elif proxy.head_dim != (head_dim := spec.shape(width, depth).head_dim):
        problems.append(f"model.head_dim: lock has {proxy.head_dim}, this model has {head_dim}")
    if problems:
        raise ConfigError(f"the lock does not fit model spec {spec.name!r}: " + "; ".join(problems))
    model = make_model(spec, width, depth, lock.hparams, param=lock.param, device=device, seed=seed)
    groups = param_groups(spec, model, lock.hparams, optimizer, width=width, depth=depth, param=lock.param)
    return model, groups
