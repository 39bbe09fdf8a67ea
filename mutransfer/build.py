"""Build a model at a shape: forward multipliers and initialisation from the muP table."""

from __future__ import annotations

import torch

from mutransfer.config import HParams, RunShape
from mutransfer.model import Transformer
from mutransfer.parametrization import forward_multipliers, init_weights


def build_model(shape: RunShape, hp: HParams, device: str | torch.device = "cpu", seed: int | None = 0
                ) -> Transformer:
    """A Transformer at ``shape`` initialised by the table; ``device="meta"`` allocates nothing.

    Built on the meta device and then given storage, so torch's default init (which the table's
    overwrites) never runs: at width 1024 it was over half of the build.
    """
    mult = forward_multipliers(shape.model, shape.param, hp)
    with torch.device("meta"):
        model = Transformer(shape.model, mult)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)  # the RoPE tables are recomputed there; every parameter is set below
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        init_weights(model, shape.model, shape.param, hp, generator=gen)
    return model


def configure_model(model: Transformer, settings) -> Transformer:
    """Apply a run's ``[train]`` execution settings to a built model, in place; returns it.

    ``activation_checkpointing`` (per block), ``loss_chunk_tokens`` (the chunked cross entropy) and
    ``compile``: each block is compiled in place (``nn.Module.compile``), so parameter names -- and
    with them the muP roles, FSDP2 units and checkpoints -- are unchanged.
    """
    from mutransfer.precision import check_checkpointing, recompute_backend

    check_checkpointing(settings.precision, settings.activation_checkpointing)
    model.set_activation_checkpointing(settings.activation_checkpointing, recompute_backend(settings.precision))
    model.loss_chunk_tokens = settings.loss_chunk_tokens
    if settings.compile:
        for block in model.layers:
            block.compile()
    return model


@torch.no_grad()
def materialize(model: Transformer, shape: RunShape, hp: HParams, device: str | torch.device, seed: int) -> None:
    """Give a meta-device model (possibly FSDP2-sharded already) real storage and its initial values.

    Each rank allocates only its own shards (``to_empty``) and writes only them: for each parameter,
    in ``build_model``'s order and from the same seeded generator, the full tensor is drawn (one
    parameter at a time, never the whole model) and the rank keeps its rows. So a sharded run starts
    from exactly the weights a one-process run starts from. Buffers that are not parameters (the
    emulated FP8 scaling history, position tables) are reset by their modules.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from mutransfer.parametrization import resolve

    device = torch.device(device)
    model.to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, p in model.named_parameters():
        setting = resolve(name, shape.model, shape.param, hp, "adamw")
        local = p.to_local() if isinstance(p, DTensor) else p
        if setting.init_std is None:
            local.fill_(1.0)
            continue
        full = torch.empty(p.shape, device=device, dtype=p.dtype).normal_(0.0, setting.init_std, generator=gen)
        if isinstance(p, DTensor):
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        local.copy_(full)
    for module in model.modules():
        for reset in ("reset_amax_history", "init_buffers"):
            if hasattr(module, reset):
                getattr(module, reset)()
