"""torch.optim.Muon that is correct under FSDP2: orthogonalize the whole matrix, never a shard.

Newton-Schulz of a row shard is not a row shard of Newton-Schulz: the iteration mixes all rows
(``X X^T``). With FSDP2 a parameter and its gradient are DTensors sharded on dim 0, so for each
matrix this optimizer does the element-wise parts (momentum, weight decay, the update) on the
local shard, all-gathers the momentum-corrected update, runs Newton-Schulz on the full matrix
(every rank, the same input, the same result), keeps its own rows and applies them. The math is
torch's own (``_zeropower_via_newtonschulz``, ``_adjust_lr`` with the full shape), so a sharded
run matches an unsharded one up to the order of the gradient reduction.

Plain tensors (one process, DDP) go straight to torch's ``Muon.step``. The cost of the redundant
Newton-Schulz on every rank is small beside the step at 1.3B (a few GEMMs of d x 2.5d per
matrix); spreading matrices over ranks would save it at the price of a second collective.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from mutransfer.optim import OptimizerSet


class GatheredMuon(torch.optim.Muon):
    """Muon for DTensor (FSDP2) parameters: gather, Newton-Schulz, keep the local rows."""

    @torch.no_grad()
    def step(self, closure=None):
        if not any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                self._update(p, state["momentum_buffer"], group)
        return loss

    @staticmethod
    def _update(p: DTensor, buf: DTensor, group: dict) -> None:
        grad, local_buf = p.grad.to_local(), buf.to_local()
        momentum = group["momentum"]
        local_buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(local_buf, momentum) if group["nesterov"] else local_buf
        full = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape,
                                  stride=p.stride()).full_tensor()
        ortho = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
        ortho_local = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
        lr = group["lr"]
        adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)
        local = p.to_local()
        local.mul_(1 - lr * group["weight_decay"])
        local.add_(ortho_local, alpha=-adjusted_lr)


def use_gathered_muon(opts: OptimizerSet) -> OptimizerSet:
    """Replace the set's torch Muon by GatheredMuon with the same groups and state (in place)."""
    old = opts.optimizers.get("muon")
    if old is None or isinstance(old, GatheredMuon):
        return opts
    new = GatheredMuon(old.param_groups)
    for p, st in old.state.items():
        new.state[p] = st
    opts.optimizers["muon"] = new
    return opts
