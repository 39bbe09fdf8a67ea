"""The single-process training loop the proxy experiments share (sweep trials, transfer checks).

Plain loop: batch for (data_seed, step) -> forward under the precision's autocast -> loss ->
backward -> clip -> LR from the schedule -> step. Held-out loss at intervals, reported to an
optional callback (a sweep's pruner). A non-finite or exploding loss raises ``Diverged``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mutransfer.build import build_model
from mutransfer.config import ConfigError, HParams, RunShape
from mutransfer.model import loss_fn
from mutransfer.optim import build_optimizers
from mutransfer.parametrization import OPTIMIZERS, check_choice
from mutransfer.schedule import wsd


class Diverged(RuntimeError):
    """Training produced a non-finite or exploding loss; ``reason`` says which and when."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrainConfig:
    """A proxy run's budget. LR follows WSD: linear warmup, constant, optional exponential decay."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    warmup: int = 30
    decay: int = 0
    final_lr_ratio: float = 1 / 16
    optimizer: str = "adamw"
    precision: str = "fp32"
    eval_every: int = 50
    eval_batches: int = 4
    eval_batch_size: int = 16
    seed: int = 0  # model initialisation
    data_seed: int = 0  # batch order
    device: str = "cpu"
    diverge_ratio: float = 4.0  # loss above this multiple of the first step's loss counts as diverged

    def validate(self, where: str = "train") -> TrainConfig:
        from mutransfer.precision import PRECISIONS

        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)} must be positive")
        if self.warmup < 0 or self.decay < 0 or self.warmup + self.decay > self.steps:
            raise ConfigError(f"{where}.warmup = {self.warmup} and {where}.decay = {self.decay} must be >= 0 "
                              f"and fit in {where}.steps = {self.steps}")
        try:
            check_choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
            check_choice(f"{where}.precision", self.precision, PRECISIONS)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class TrainResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    tokens: int = 0
    seconds: float = 0.0

    def final_val(self, last_k: int = 1) -> float:
        """Mean of the last ``last_k`` held-out evaluations."""
        vals = [v for _, v in self.val_losses[-last_k:]]
        return sum(vals) / len(vals) if vals else math.nan


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, tc: TrainConfig) -> float:
    """Mean held-out loss over a fixed set of validation windows."""
    from mutransfer.precision import autocast

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in dataset.eval_batches("val", tc.eval_batch_size, tc.seq_len, tc.eval_batches):
        x, y = x.to(tc.device), y.to(tc.device)
        with autocast(tc.precision, torch.device(tc.device).type):
            loss = loss_fn(model(x), y)
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    return total / count


def train_proxy(shape: RunShape, hp: HParams, tc: TrainConfig, dataset,
                on_eval: Callable[[int, float], None] | None = None,
                on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``shape`` with base hyperparameters ``hp``; returns losses. Raises ``Diverged``."""
    from mutransfer.precision import autocast, prepare_model

    tc.validate()
    dataset.check_tokenizer(shape.model.tokenizer)
    model = build_model(shape, hp, device=tc.device, seed=tc.seed)
    model = prepare_model(model, tc.precision)
    opt = build_optimizers(model, shape, hp, tc.optimizer)
    schedule = wsd(tc.steps, tc.warmup, tc.decay, tc.final_lr_ratio)
    result = TrainResult()
    start = time.perf_counter()
    first_loss = None
    device_type = torch.device(tc.device).type
    for step in range(tc.steps):
        x, y = dataset.batch("train", tc.data_seed, step, tc.batch_size, tc.seq_len)
        x, y = x.to(tc.device), y.to(tc.device)
        with autocast(tc.precision, device_type):
            loss = loss_fn(model(x), y)
        loss.backward()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.set_lr_factor(schedule.factor(step))
        opt.step()
        opt.zero_grad()
        value = loss.item()
        result.train_losses.append(value)
        result.tokens += x.numel()
        first_loss = value if first_loss is None else first_loss
        if not math.isfinite(value):
            raise Diverged(f"training loss is {value} at step {step}")
        if value > tc.diverge_ratio * first_loss and step > 0:
            raise Diverged(f"training loss {value:.4g} at step {step} exceeds {tc.diverge_ratio}x "
                           f"the first step's {first_loss:.4g}")
        if on_step is not None:
            on_step(step, value)
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            val = evaluate(model, dataset, tc)
            if not math.isfinite(val):
                raise Diverged(f"held-out loss is {val} at step {step + 1}")
            result.val_losses.append((step + 1, val))
            if on_eval is not None:
                on_eval(step + 1, val)
    result.seconds = time.perf_counter() - start
    return result
