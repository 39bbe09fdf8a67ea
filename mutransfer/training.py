"""The single-process proxy run the experiments share (sweep trials, transfer checks).

Plain loop around the shared step (``mutransfer.step``): batch for (data_seed, step) -> LR from
the WSD schedule -> ``train_step`` -> divergence rule. Held-out loss at intervals (per evaluation
batch too, so a transfer check can bootstrap over the held-out windows), reported to an optional
callback (a sweep's pruner). A non-finite or exploding loss raises ``Diverged``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mutransfer.build import build, configure_model
from mutransfer.config import HParams, ProxyTrain, RunShape
from mutransfer.optim import build_optimizers
from mutransfer.rundir import pick_device
from mutransfer.schedule import wsd
from mutransfer.specs import spec_of
from mutransfer.step import Diverged, DivergenceGuard, evaluate, train_step

__all__ = ["Diverged", "TrainResult", "train_proxy", "ProxyTrain"]


@dataclass
class TrainResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    val_batch_losses: list[tuple[int, list[float]]] = field(default_factory=list)  # (step, per eval batch)
    grad_norms: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def final_val(self, last_k: int = 1) -> float:
        """Mean of the last ``last_k`` held-out evaluations."""
        vals = [v for _, v in self.val_losses[-last_k:]]
        return sum(vals) / len(vals) if vals else math.nan

    def final_val_batches(self, last_k: int = 1) -> list[float]:
        """Per evaluation batch, the mean over the last ``last_k`` evaluations (bootstrap input)."""
        rows = [b for _, b in self.val_batch_losses[-last_k:]]
        return [sum(col) / len(col) for col in zip(*rows, strict=True)] if rows else []


def eval_batches(dataset, tc: ProxyTrain):
    return dataset.eval_batches("val", tc.eval_batch_size, tc.eval_seq_len or tc.seq_len, tc.eval_batches)


def short_eval_warning(dataset, tc: ProxyTrain) -> str | None:
    """The run-start warning when ``dataset``'s held-out split holds less than one evaluation of ``tc``."""
    return dataset.short_eval_warning(tc.eval_batches, tc.eval_batch_size, tc.eval_seq_len or tc.seq_len)


def train_proxy(shape: RunShape, hp: HParams, tc: ProxyTrain, dataset,
                on_eval: Callable[[int, float], None] | None = None,
                on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``shape`` with base hyperparameters ``hp``; returns losses. Raises ``Diverged``."""
    from mutransfer.precision import prepare_model

    dataset.check_tokenizer(shape.model.tokenizer)
    device = pick_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    spec = spec_of(shape.model)
    model = build(spec, shape.model.d_model, shape.model.n_layers, shape.param, hp, device=device, seed=tc.seed)
    model = prepare_model(model, tc.precision)
    opt = build_optimizers(model, spec, shape.model, shape.param, hp, tc.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    runner = configure_model(model, tc, spec)
    schedule = wsd(tc.steps, tc.warmup, tc.decay, tc.final_lr_ratio)
    guard = DivergenceGuard(tc.diverge_ratio)
    held_out = eval_batches(dataset, tc)
    result = TrainResult()
    start = time.perf_counter()
    for step in range(tc.steps):
        x, y = dataset.batch("train", tc.data_seed, step, tc.batch_size, tc.seq_len)
        micro = [(xs.to(device), ys.to(device)) for xs, ys in zip(x.chunk(tc.micro_batches), y.chunk(tc.micro_batches),
                                                                   strict=True)]
        out = train_step(runner, opt, micro, params=params, precision=tc.precision,
                         device_type=device.type, grad_clip=hp.grad_clip, lr_factor=schedule.factor(step),
                         loss_of=spec.loss)
        result.train_losses.append(out.loss)
        result.grad_norms.append(out.grad_norm)
        result.tokens += x.numel()
        guard.check(step, out.loss)
        if on_step is not None:
            on_step(step, out.loss)
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            try:
                ev = evaluate(runner, held_out, precision=tc.precision, device=device, loss_of=spec.loss)
            except Diverged as e:
                raise Diverged(f"{e.reason} at step {step + 1}") from None
            result.val_losses.append((step + 1, ev.loss))
            result.val_batch_losses.append((step + 1, ev.batch_losses))
            if on_eval is not None:
                on_eval(step + 1, ev.loss)
    result.seconds = time.perf_counter() - start
    return result
