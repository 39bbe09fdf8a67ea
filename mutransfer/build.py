"""Build a model at a shape through its spec: forward multipliers and initialisation from the muP table."""

from __future__ import annotations

import torch
from torch import nn

from mutransfer.config import HParams, ParamConfig, RunShape
from mutransfer.parametrization import forward_multipliers, init_weights
from mutransfer.spec import ModelSpec


def build(spec: ModelSpec, width: int, depth: int, param: ParamConfig, hp: HParams,
          device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Module:
    """``spec``'s model at ``width`` and ``depth``, its forward multipliers applied and every parameter
    initialised by the table (``seed``: a generator of its own; None: torch's global RNG).

    A ``meta_build`` spec is built on the meta device and then given storage (``materialize``), so
    torch's default init (which the table's overwrites) never runs: at width 1024 that was over half
    of the built-in Transformer's build. ``device="meta"`` allocates nothing. The role map is checked
    against every parameter name first: one error lists each name no pattern (or two) matches.
    """
    shape = spec.shape(width, depth)
    meta = torch.device(device).type == "meta"
    with torch.device("meta" if (spec.meta_build or meta) else device):
        model = spec.build(width, depth)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model spec {spec.name!r}: build({width}, {depth}) returned {type(model).__name__}, "
                        "not an nn.Module")
    spec.roles.check([n for n, _ in model.named_parameters()], where=f"model spec {spec.name!r} roles")
    spec.apply_multipliers(model, forward_multipliers(shape, param, hp))
    if spec.meta_build and not meta:
        materialize(model, spec, shape, param, hp, device, seed)
    elif not meta:
        init_weights(model, shape, param, hp, generator=_generator(device, seed), roles=spec.roles)
    return model


def build_model(shape: RunShape, hp: HParams, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Module:
    """The built-in Transformer at ``shape`` (``build`` with its spec)."""
    from mutransfer.transformer_spec import transformer_spec

    return build(transformer_spec(shape.model), shape.model.d_model, shape.model.n_layers, shape.param, hp,
                 device, seed)


def configure_model(model: nn.Module, settings, spec: ModelSpec) -> nn.Module:
    """Apply a run's ``[train]`` execution settings to a built model, in place; returns it.

    ``activation_checkpointing`` and ``loss_chunk_tokens`` reach a model that offers them
    (``set_activation_checkpointing(policy, backend)``, a ``loss_chunk_tokens`` attribute: the
    built-in Transformer); asking a model without them for checkpointing is an error naming the
    field. ``compile``: each of the spec's blocks is compiled in place (``nn.Module.compile``; the
    whole model when the spec names none), so parameter names -- and with them the muP roles, FSDP2
    units and checkpoints -- are unchanged.
    """
    from mutransfer.config import ConfigError
    from mutransfer.precision import check_checkpointing, recompute_backend

    policy = settings.activation_checkpointing
    check_checkpointing(settings.precision, policy)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(policy, recompute_backend(settings.precision))
    elif policy != "none":
        raise ConfigError(f"train.activation_checkpointing = {policy!r}: model spec {spec.name!r} builds a "
                          f"{type(model).__name__}, which offers no activation checkpointing; use 'none'")
    if hasattr(model, "loss_chunk_tokens"):
        model.loss_chunk_tokens = settings.loss_chunk_tokens
    if settings.compile:
        blocks = [model.get_submodule(n) for n in spec.block_names(model)]
        for block in blocks or [model]:
            block.compile()
    return model


def _generator(device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@torch.no_grad()
def materialize(model: nn.Module, spec: ModelSpec, shape, param: ParamConfig, hp: HParams,
                device: str | torch.device, seed: int | None) -> None:
    """Give a meta-device model (possibly FSDP2-sharded already) real storage and its initial values.

    Each rank allocates only its own shards (``to_empty``) and writes only them (``init_weights``:
    in ``build``'s order and from the same seeded generator -- ``seed=None``: torch's global
    one -- so a sharded run starts from exactly the weights a one-process run starts from). Buffers
    that are not parameters (the emulated FP8 scaling history, position tables) are reset by their
    modules.
    """
    model.to_empty(device=device)
    init_weights(model, shape, param, hp, generator=_generator(device, seed), roles=spec.roles)
    for module in model.modules():
        for reset in ("reset_amax_history", "init_buffers"):
            if hasattr(module, reset):
                getattr(module, reset)()
