"""Process group, device and data-parallel wrapping (DDP or FSDP2) for one process or torchrun.

One process: no process group, no wrapper. Under torchrun (``WORLD_SIZE`` set): NCCL on CUDA,
gloo on CPU. FSDP2 shards every transformer block, then the root (embedding, final norm), as
torchtitan does; the tied output layer reads the root's embedding, so nothing is split across
units.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mutransfer.config import ConfigError
from mutransfer.rundir import pick_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this code initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_setting: str) -> DistEnv:
    """Join torchrun's process group when launched by it; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)  # the one device rule (mutransfer.rundir)
    if world == 1 and not dist.is_initialized():
        return DistEnv(0, 1, 0, device, owns_group=False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=(
            device if device.type == "cuda" else None))
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=owns)


def teardown(env: DistEnv, finished: bool) -> None:
    """Leave the run: after a finished run every rank waits for the others, then the group this code
    made is destroyed.

    The ranks do not end a run in step (rank 0 alone reads the metrics and writes the summary), and a
    rank that destroys its gloo group, or whose caller does, while another is still busy can be
    aborted at exit by gloo's transport threads ("terminate called without an active exception",
    seen on a 2-process run under load). After an error there is no barrier: the other ranks may
    never reach it, and torchrun ends them when this one exits.
    """
    if finished and env.distributed and dist.is_initialized():
        dist.barrier()
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_across(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over data-parallel ranks (the global-batch loss)."""
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def fsdp_mixed_precision(precision: str):
    """FSDP2's policy: under bf16/FP8 gather bf16 parameters and reduce gradients in float32, as
    torchtitan does (``mutransfer.memory.fsdp_gather_bytes`` counts the same); fp32 as is."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(model: nn.Module, env: DistEnv, mode: str, precision: str = "fp32",
         blocks: list[nn.Module] = ()) -> nn.Module:
    """DDP, or FSDP2 per block (``blocks``: the model spec's) then root; the returned module is what
    the loop calls.

    FSDP2 changes the module in place (same names, DTensor parameters) and works on a meta-device
    model too (shard first, allocate after); DDP wraps a materialised one, and the caller keeps the
    inner module for optimizers and checkpoints. Under bf16/FP8 FSDP2 gathers bf16 parameters and
    reduces gradients in float32 (``fsdp_mixed_precision``), as torchtitan does; master weights,
    gradients and optimizer states stay float32.
    """
    if not env.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = fsdp_mixed_precision(precision)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise ConfigError(f"parallel.mode = {mode!r}: allowed 'fsdp', 'ddp'")


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield
