"""Build a model at a shape: forward multipliers and initialisation from the muP table."""

from __future__ import annotations

import torch

from mutransfer.config import HParams, RunShape
from mutransfer.model import Transformer
from mutransfer.parametrization import forward_multipliers, init_weights


def build_model(shape: RunShape, hp: HParams, device: str | torch.device = "cpu", seed: int | None = 0
                ) -> Transformer:
    """A Transformer at ``shape`` initialised by the table; ``device="meta"`` allocates nothing.

    Built on the meta device and then given storage (``materialize``), so torch's default init
    (which the table's overwrites) never runs: at width 1024 it was over half of the build.
    """
    mult = forward_multipliers(shape.model, shape.param, hp)
    with torch.device("meta"):
        model = Transformer(shape.model, mult)
    if torch.device(device).type != "meta":
        materialize(model, shape, hp, device, seed)
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
def materialize(model: Transformer, shape: RunShape, hp: HParams, device: str | torch.device,
                seed: int | None) -> None:
    """Give a meta-device model (possibly FSDP2-sharded already) real storage and its initial values.

    Each rank allocates only its own shards (``to_empty``) and writes only them (``init_weights``:
    in ``build_model``'s order and from the same seeded generator -- ``seed=None``: torch's global
    one -- so a sharded run starts from exactly the weights a one-process run starts from). Buffers
    that are not parameters (the emulated FP8 scaling history, position tables) are reset by their
    modules.
    """
    model.to_empty(device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    init_weights(model, shape.model, shape.param, hp, generator=gen)
    for module in model.modules():
        for reset in ("reset_amax_history", "init_buffers"):
            if hasattr(module, reset):
                getattr(module, reset)()
