"""Precision backends: what runs the transformer's GEMMs, and the autocast around the forward pass.

- ``fp32``: everything in float32.
- ``bf16``: float32 master weights, bf16 autocast.
- ``fp8-emulated``: Transformer Engine's HYBRID delayed-scaling FP8 imitated by fake quantization
  (``fp8_emulated``), on any device; bf16 autocast for the rest, as TE runs its non-FP8 parts.
- ``fp8-te``: NVIDIA Transformer Engine (RECIPE section 5); CUDA and an FP8 GPU only.
- ``fp8-torchao``: torchao float8 training (dynamic scaling); CUDA and an FP8 GPU only.

FP8 applies to the transformer GEMMs only -- every ``nn.Linear`` (wq, wk, wv, wo, w1, w2, w3).
The embedding, the tied output layer (a functional ``F.linear``, not an ``nn.Linear``), the norms
and the attention core stay in bf16/fp32. ``prepare_model`` keeps module and parameter names, so
the muP roles, which are assigned by name, do not change.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mutransfer.config import PRECISIONS, ConfigError, ModelConfig
from mutransfer.precision import fp8_emulated, fp8_te, fp8_torchao
from mutransfer.precision.fp8_emulated import DelayedScalingConfig, Fp8EmulatedLinear

FP8_PRECISIONS = ("fp8-emulated", "fp8-te", "fp8-torchao")
FP8_DIM_MULTIPLE = 16  # FP8 GEMMs need dimensions divisible by 16 (RECIPE section 5)

__all__ = ["PRECISIONS", "FP8_PRECISIONS", "DelayedScalingConfig", "Fp8EmulatedLinear", "autocast",
           "available", "check_checkpointing", "check_dims", "prepare_model", "recompute_backend"]


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision = {precision!r} is not allowed; choose one of {list(PRECISIONS)}")


def available(precision: str) -> tuple[bool, str]:
    """Whether ``precision`` can run on this machine, and if not, why (with what to install)."""
    _check(precision)
    if precision == "fp8-te":
        return fp8_te.available()
    if precision == "fp8-torchao":
        return fp8_torchao.available()
    return True, ""


def check_dims(model_cfg: ModelConfig, precision: str, where: str = "model") -> None:
    """Fail before any compute when an FP8 GEMM dimension is not a multiple of 16."""
    _check(precision)
    if precision not in FP8_PRECISIONS:
        return
    dims = {"d_model": model_cfg.d_model}
    if isinstance(model_cfg, ModelConfig):  # a spec model's layers are checked when they are swapped
        dims |= {"ffn_dim": model_cfg.ffn_dim, "n_heads * head_dim": model_cfg.n_heads * model_cfg.head_dim,
                 "n_kv_heads * head_dim": model_cfg.n_kv_heads * model_cfg.head_dim}
    bad = [f"{where}.{name} = {value}" for name, value in dims.items() if value % FP8_DIM_MULTIPLE]
    if bad:
        raise ConfigError(f"precision = {precision!r}: {', '.join(bad)} not divisible by {FP8_DIM_MULTIPLE} "
                          f"(FP8 GEMMs need dimensions divisible by {FP8_DIM_MULTIPLE})")


def _check_linear_dims(model: nn.Module, precision: str) -> None:
    m16 = FP8_DIM_MULTIPLE
    bad = [f"{name} ({m.in_features} -> {m.out_features})" for name, m in model.named_modules()
           if type(m) is nn.Linear and (m.in_features % m16 or m.out_features % m16)]
    if bad:
        raise ConfigError(f"precision = {precision!r}: linear layers {bad} have a dimension not divisible by "
                          f"{FP8_DIM_MULTIPLE} (FP8 GEMMs need dimensions divisible by {FP8_DIM_MULTIPLE})")


def check_checkpointing(precision: str, policy: str, where: str = "train.activation_checkpointing") -> None:
    """Transformer Engine's FP8 state survives only its own checkpoint (full recomputation): a
    selective policy, which needs torch's selective checkpointing, is refused with fp8-te."""
    if precision == "fp8-te" and policy == "selective":
        raise ConfigError(f"{where} = 'selective' is not supported with precision 'fp8-te': Transformer "
                          "Engine's FP8 state survives only its own checkpoint, which recomputes whole blocks; "
                          "use 'full' or 'none' (or precision 'fp8-torchao' / 'bf16' for 'selective')")


def recompute_backend(precision: str) -> str:
    """Whose checkpoint recomputes a block: Transformer Engine's for fp8-te, torch's otherwise."""
    return "te" if precision == "fp8-te" else "torch"


def prepare_model(model: nn.Module, precision: str) -> nn.Module:
    """Put the backend's linear in place of every ``nn.Linear``; names kept. fp32/bf16: no-op.

    ``fp8-emulated`` and ``fp8-torchao`` keep the very parameter tensors; ``fp8-te`` copies the
    weights into TE's own parameters, so build the optimizer after this call (the trainers do).
    """
    _check(precision)
    if precision not in FP8_PRECISIONS:
        return model
    _check_linear_dims(model, precision)
    if precision == "fp8-emulated":
        return fp8_emulated.swap_linears(model)
    if precision == "fp8-te":
        return fp8_te.prepare(model)
    return fp8_torchao.prepare(model)


def autocast(precision: str, device_type: str, first_microbatch: bool | None = None):
    """The context for the forward pass (the loss included; backward may run outside it).

    ``fp8-emulated`` uses bf16 autocast like TE: the emulated linear turns autocast off for its
    own GEMM (float32 accumulation of FP8 values) and returns bf16, as an FP8 GEMM does.
    """
    _check(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp8-te":
        return fp8_te.autocast(device_type, first_microbatch=first_microbatch)
    return torch.autocast(device_type, dtype=torch.bfloat16)
