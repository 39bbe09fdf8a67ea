"""FP8 with NVIDIA Transformer Engine: the production engine of RECIPE section 5.

Transformer Engine cannot be installed or imported without CUDA, so it is imported lazily, only
when this backend is asked for. UNTESTED on the CPU machine this was written on: the code follows
TE's documented 1.x/2.x API (``te.pytorch.Linear``, ``fp8_autocast``,
``recipe.DelayedScaling``). Unlike the emulated backend, ``te.pytorch.Linear`` creates its own
``weight`` parameter (TE sets attributes on it that its kernels read), so the weights are copied
and the parameter tensors are new: build the optimizer after ``prepare_model``. The names stay
the same, so muP roles are unaffected.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from mutransfer.precision.fp8_emulated import DelayedScalingConfig
from mutransfer.precision.gpu import fp8_gpu_available

INSTALL = ('install Transformer Engine with pip install "mutransfer[fp8]" (transformer-engine[pytorch]); '
           "it needs CUDA and an FP8-capable NVIDIA GPU "
           "(Ada, Hopper or Blackwell, compute capability >= 8.9)")
RECIPE = DelayedScalingConfig()  # RECIPE section 5: HYBRID, history 128, "max", margin 0


def _import_te():
    """``transformer_engine.pytorch``, or ImportError saying what to install."""
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # TE raises OSError/RuntimeError, not only ImportError, without CUDA
        raise ImportError(f"precision 'fp8-te' is unavailable: transformer_engine cannot be imported "
                          f"({type(e).__name__}: {e}); {INSTALL}") from e
    return te


def available() -> tuple[bool, str]:
    return fp8_gpu_available("fp8-te", _import_te, INSTALL)


def _require():
    ok, why = available()
    if not ok:
        raise (ImportError if "cannot be imported" in why else RuntimeError)(why)
    return _import_te()


@functools.cache
def te_recipe(cfg: DelayedScalingConfig = RECIPE):
    """TE's ``DelayedScaling`` with the RECIPE values (HYBRID, history 128, max, margin 0).

    One object per config, so every step's ``fp8_autocast`` sees the same recipe.
    """
    from transformer_engine.common.recipe import DelayedScaling, Format

    return DelayedScaling(fp8_format=getattr(Format, cfg.fp8_format), amax_history_len=cfg.amax_history_len,
                          amax_compute_algo=cfg.amax_compute_algo, margin=cfg.margin)


def prepare(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` by ``te.pytorch.Linear`` with the same name and weights."""
    te = _require()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            new = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                            params_dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            new.train(child.training)
            setattr(parent, name, new)
    return model


@contextlib.contextmanager
def autocast(device_type: str, cfg: DelayedScalingConfig = RECIPE):
    """bf16 autocast for the non-FP8 parts, TE's FP8 autocast with delayed scaling for its modules."""
    te = _require()
    with torch.autocast(device_type, dtype=torch.bfloat16), \
            te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(cfg)):
        yield
