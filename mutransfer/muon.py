"""Muon for every run: plain tensors, FSDP2-sharded ones, and the recipe's fused matrices.

The arithmetic is torch's own (``torch.optim.Muon``, whose private helper ``_adjust_lr`` this
module is the one adapter for), step by step, so a plain run on a GPU is bit-identical to
``torch.optim.Muon``. Three things torch's Muon cannot do:

- **CPU speed**: torch runs Newton-Schulz in bfloat16, and a CPU without native bf16 matrix units
  multiplies bf16 about 13x slower than float32 (256 x 768: 0.15 against 0.012 s on a 2-core Xeon
  VM); at width 256 a Muon step of ``tiny`` took 12 s against 0.2 s for its forward and backward.
  So the iteration (torch's, op for op, ``newton_schulz``) runs in float32 on CPU and in bfloat16
  elsewhere (``ns_dtype``); with bfloat16 forced it is torch's to the bit (test).

- **FSDP2**: a parameter and its gradient are DTensors sharded on dim 0, and Newton-Schulz of a
  row shard is not a row shard of Newton-Schulz (the iteration mixes all rows). The element-wise
  parts (momentum, weight decay, the update) run on the local shard; the momentum-corrected
  update is all-gathered, orthogonalised whole on every rank (same input, same result), and each
  rank keeps its own rows.
- **Fused matrices** (RECIPE section 4): Megatron stores Q, K, V as one [q + 2 kv, d] matrix and
  the SwiGLU gate and up as one [2 ffn, d] matrix, so the recipe's Muon orthogonalised each fused
  matrix and scaled it by 0.2 sqrt(max) of the fused shape -- a different direction and scale
  from per-matrix Muon. A param group with ``fuse = True`` does that with our separate matrices:
  the updates of one block's wq|wk|wv (or w1|w3) are stacked in that order, orthogonalised
  together, and split back (the group's ``fuse_keys``, from the model spec's ``fuse_key``, name the sets).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update, also for DTensor (FSDP2) parameters and fused matrix sets."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group.get("fuse"):
                keys = dict(zip(map(id, group["params"]), group["fuse_keys"], strict=True))
                sets: dict[str, list[torch.Tensor]] = {}
                for p in params:
                    sets.setdefault(keys[id(p)], []).append(p)
                for members in sets.values():
                    self._update(members, group)
            else:
                for p in params:
                    self._update([p], group)
        return loss

    def _momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The Nesterov (or plain) momentum update of ``p``, local rows when sharded."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        grad, buf = _local(p.grad), _local(state["momentum_buffer"])
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _update(self, members: list[torch.Tensor], group: dict) -> None:
        local = [self._momentum_update(p, group) for p in members]
        full = [_full(u, p) for u, p in zip(local, members, strict=True)]
        stacked = full[0] if len(full) == 1 else torch.cat(full, dim=0)
        ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"],
                              ns_dtype(stacked.device))
        lr = group["lr"]
        adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], stacked.shape)
        rows = [f.shape[0] for f in full]
        for p, part in zip(members, ortho.split(rows, dim=0) if len(full) > 1 else [ortho], strict=True):
            weight = _local(p)
            weight.mul_(1 - lr * group["weight_decay"])
            weight.add_(_shard_like(part, p), alpha=-adjusted_lr)


def ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matrix units make it fast (torch's choice), float32 on CPU (see the module doc)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, op for op, in ``dtype``: an approximate
    U V^T of the (2-D) update, on its wider side."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (possibly sharded) update."""
    if not isinstance(p, DTensor):
        return update
    return DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole matrix, sharded as ``p`` is (no communication)."""
    if not isinstance(p, DTensor):
        return full
    return distribute_tensor(full.contiguous(), p.device_mesh, p.placements, src_data_rank=None).to_local()
