"""The reference for tests/test_mup_oracle.py: our Transformer set up as a user of microsoft's ``mup`` would.

Nothing here comes from mutransfer.parametrization's tables. The model is our ``Transformer`` (same
modules, same parameter names) with

- forward constants a mup user writes into the model: input multiplier ``alpha_in`` and residual
  multiplier ``alpha_res / sqrt(L)`` (GPT-2 style; width-free constants -- the package has no depth
  rule, so a mup user picks one for the depth at hand), attention softmax scale
  ``attn_mult / d_head`` with ``attn_mult = 1``, and the tied output layer replaced by mup's
  ``MuSharedReadout`` on the embedding matrix, which computes ``(output_mult * h / width_mult) E^T``;
- base shapes from ``mup.set_base_shapes(model, base, delta=delta)`` with base and delta the same
  architecture (same depth) at widths 64 and 128, so mup infers which dimensions are "infinite";
- initialisation by ``mup.init`` (``normal_(std=sigma)`` on every matrix, ``ones_`` on the norm gains);
- ``mup.MuAdamW(model.parameters(), lr=eta, weight_decay=lambda, eps=eps)``.
"""

from __future__ import annotations

import math

import mup
import torch
from torch import nn

from mutransfer.config import HParams, ModelConfig
from mutransfer.model import Transformer
from mutransfer.parametrization import ForwardMultipliers
from mutransfer.presets import at_depth, at_width, get_preset

TINY = get_preset("tiny").model
BASE_WIDTH = 64  # mup's base model: the preset's d_base
DELTA_WIDTH = 128  # mup's delta model: only tells mup which dimensions grow with width


def config_at(width: int, depth: int | None = None) -> ModelConfig:
    """The tiny preset at ``width`` (and ``depth`` blocks; default the preset's, 4)."""
    cfg = at_width(TINY, width)
    return cfg if depth is None else at_depth(cfg, depth)


class MuTiedLogits(nn.Module):
    """Stands in for the model's ``TiedLogits``: mup's ``MuSharedReadout`` on the embedding matrix."""

    def __init__(self, embedding_weight: nn.Parameter, output_mult: float):
        super().__init__()
        self.readout = mup.MuSharedReadout(embedding_weight, bias=False, output_mult=output_mult)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        assert embedding is self.readout.weight, "the readout must share the embedding matrix"
        return self.readout(h)


def mup_user_multipliers(cfg: ModelConfig, hp: HParams) -> ForwardMultipliers:
    """The constants a mup user puts in the model; the 1/width on the logits is MuSharedReadout's job."""
    return ForwardMultipliers(
        embedding=hp.alpha_in,
        residual_attn=hp.alpha_res / math.sqrt(cfg.n_layers),
        residual_ffn=hp.alpha_res / math.sqrt(cfg.n_layers),
        logits=1.0,
        attn_scale=1.0 / cfg.head_dim,  # attn_mult / d_head, attn_mult = 1
    )


def unshaped_model(cfg: ModelConfig, hp: HParams, device: str = "cpu") -> Transformer:
    """The reference architecture, before ``set_base_shapes``."""
    with torch.device(device):
        model = Transformer(cfg, mup_user_multipliers(cfg, hp))
        model.output = MuTiedLogits(model.tok_embeddings.weight, output_mult=hp.alpha_out)
    return model


def shaped_model(width: int, hp: HParams, rescale_params: bool = True, depth: int | None = None) -> Transformer:
    """The reference at ``width`` (and ``depth``) with mup's base shapes set (base 64, delta 128, same
    depth: mup scales width only); weights not yet set."""
    base = unshaped_model(config_at(BASE_WIDTH, depth), hp, device="meta")
    delta = unshaped_model(config_at(DELTA_WIDTH, depth), hp, device="meta")
    model = unshaped_model(config_at(width, depth), hp)
    mup.set_base_shapes(model, base, delta=delta, rescale_params=rescale_params)
    return model


@torch.no_grad()
def mup_init(model: nn.Module, sigma: float, seed: int) -> None:
    """mup's initialisers on every parameter, in order, from the global RNG seeded with ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in model.parameters():
            if p.dim() == 1:
                mup.init.ones_(p)
            else:
                mup.init.normal_(p, std=sigma)


def reference_model(width: int, hp: HParams, seed: int, depth: int | None = None) -> Transformer:
    """Shaped as mup wants, then initialised by mup (after set_base_shapes, which may rescale)."""
    model = shaped_model(width, hp, depth=depth)
    mup_init(model, hp.init_std, seed)
    return model


def mup_optimizer(model: nn.Module, hp: HParams) -> torch.optim.AdamW:
    return mup.MuAdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                       betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps)


def settings_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, float]]:
    """Each parameter's lr, weight_decay and eps as the optimizer holds them, keyed by parameter name."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of[id(p)]
            assert name not in out, f"{name} is in two parameter groups"
            out[name] = {"lr": group["lr"], "weight_decay": group["weight_decay"], "eps": group["eps"]}
    assert set(out) == set(name_of.values()), "every parameter must be in exactly one group"
    return out
