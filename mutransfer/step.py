"""One training step and one evaluation, shared by every loop that trains.

The proxy trials and transfer checks (``mutransfer.training``), the coordinate check
(``mutransfer.coord``, whose recorder wraps this step) and the full-scale trainer
(``full_scale.trainer``) all call ``train_step``, so the proxy that tunes a learning rate trains
exactly like the target it is tuned for. What differs between them is passed in as policy:

- the micro-batches of the step (one for a proxy trial, ``accumulation`` at full scale);
- ``sync(is_last)``: a context around each micro-batch's backward (DDP's ``no_sync`` / FSDP2's
  ``set_requires_gradient_sync``), so gradients are reduced once per step;
- ``reduce(loss)``: the mean over data-parallel ranks of the step's loss;
- ``before_optimizer_step()``: a hook between the gradient and the update (the coordinate check
  copies the weights there to measure the update's effect);
- ``loss_of(model, x, y)``: how the loss is computed; by default the model's own chunked cross
  entropy (``model(x, y)``); the coordinate check materialises the logits to observe them.

Per step: forward (the model computes the chunked cross entropy itself) under the precision's
autocast, backward with the loss divided by the number of micro-batches, the global gradient norm
(sharded gradients included) and clipping, the LR factor, the optimizer step, zeroed gradients.
``DivergenceGuard`` is the one divergence rule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class Diverged(RuntimeError):
    """Training produced a non-finite or exploding loss; ``reason`` says which and when."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss of the step's (global) batch
    grad_norm: float  # global gradient norm before clipping


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean held-out loss, weighted by rows
    batch_losses: list[float] = field(default_factory=list)  # one per evaluation batch (for the bootstrap)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm (DTensor shards included), clipped to ``max_norm`` when it is > 0.

    The same two calls as ``torch.nn.utils.clip_grad_norm_``, with the norm made whole when the
    gradients are sharded (FSDP2), so one process and N processes clip alike.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _no_sync(is_last: bool):
    return contextlib.nullcontext()


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's own (chunked) mean cross entropy."""
    return model(x, y)


def train_step(model: nn.Module, optimizer, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
               params: Sequence[torch.Tensor], precision: str, device_type: str, grad_clip: float,
               lr_factor: float | None = None,
               sync: Callable[[bool], contextlib.AbstractContextManager] = _no_sync,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               before_optimizer_step: Callable[[], None] | None = None,
               loss_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = model_loss
               ) -> StepResult:
    """One optimizer step over ``micro_batches`` (already on the device); see the module docstring.

    ``optimizer`` is an ``OptimizerSet`` (or anything with ``step``, ``zero_grad`` and, when
    ``lr_factor`` is given, ``set_lr_factor``).
    """
    from mutransfer.precision import autocast

    accumulation = len(micro_batches)
    loss_sum = None
    for k, (x, y) in enumerate(micro_batches):
        with sync(k == accumulation - 1):
            with autocast(precision, device_type, first_microbatch=(k == 0) if accumulation > 1 else None):
                loss = loss_of(model, x, y)
                if accumulation > 1:
                    loss = loss / accumulation
            loss.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    grad_norm = clip_grad_norm(params, grad_clip)
    if lr_factor is not None:
        optimizer.set_lr_factor(lr_factor)
    if before_optimizer_step is not None:
        before_optimizer_step()
    optimizer.step()
    optimizer.zero_grad()
    if reduce is not None:
        loss_sum = reduce(loss_sum)
    return StepResult(loss=loss_sum.item(), grad_norm=float(grad_norm))


class DivergenceGuard:
    """The one divergence rule: a non-finite loss, or one above ``ratio`` x the first step's loss."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.first: float | None = None

    def check(self, step: int, loss: float, where: str = "") -> None:
        at = f"step {step}" + (f" ({where})" if where else "")
        if not math.isfinite(loss):
            raise Diverged(f"training loss is {loss} at {at}")
        if self.first is None:
            self.first = loss
        elif loss > self.ratio * self.first:
            raise Diverged(f"training loss {loss:.4g} at {at} exceeds {self.ratio}x the first step's "
                           f"{self.first:.4g}")

    def state_dict(self) -> dict:
        return {"first": self.first}

    def load_state_dict(self, state: dict) -> None:
        self.first = state.get("first")


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, precision: str, device: torch.device | str,
             loss_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = model_loss) -> EvalResult:
    """Mean held-out loss over fixed batches (every rank runs the same batches: FSDP needs all ranks);
    ``loss_of`` as in ``train_step`` (a model spec's ``loss``)."""
    from mutransfer.precision import autocast

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count, per_batch = 0.0, 0, []
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(precision, device.type):
                value = loss_of(model, x, y).item()
            per_batch.append(value)
            total += value * x.shape[0]
            count += x.shape[0]
    finally:
        model.train(was_training)
    loss = total / count if count else math.nan
    if not math.isfinite(loss):
        raise Diverged(f"held-out loss is {loss}")
    return EvalResult(loss=loss, batch_losses=per_batch)
