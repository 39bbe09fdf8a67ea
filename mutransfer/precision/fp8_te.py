"""FP8 with NVIDIA Transformer Engine: the production engine of RECIPE section 5.

Transformer Engine cannot be installed or imported without CUDA, so it is imported lazily, only
when this backend is asked for. UNTESTED on the CPU machine this was written on: the code follows
TE's documented API (``te.pytorch.Linear`` with ``is_first_microbatch`` under gradient
accumulation, ``te.autocast(recipe=...)`` with a fallback to the older ``fp8_autocast``,
``recipe.DelayedScaling``, ``te.checkpoint`` for activation recomputation). Unlike the
emulated backend, ``te.pytorch.Linear`` creates its own ``weight`` parameter (TE sets attributes on
it that its kernels read), so the weights are copied and the parameter tensors are new: build the
optimizer after ``prepare_model``. The names stay the same, so muP roles are unaffected.
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


# Whether the current forward is the first micro-batch of an optimizer step (None: not accumulating).
# TE casts a weight to FP8 once per step when told (``is_first_microbatch``): the weights do not
# change between the micro-batches of one step, so the later ones reuse the cast.
_first_microbatch: bool | None = None


@functools.cache
def linear_class():
    """``te.pytorch.Linear`` that passes the step's micro-batch position on (a plain ``forward(x)``)."""
    te = _require()

    class Linear(te.Linear):
        def forward(self, x):
            return super().forward(x, is_first_microbatch=_first_microbatch)

    return Linear


def prepare(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` by TE's Linear (``linear_class``) with the same name and weights."""
    linear = linear_class()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            new = linear(child.in_features, child.out_features, bias=child.bias is not None,
                         params_dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            new.train(child.training)
            setattr(parent, name, new)
    return model


class _NoRngTracker:
    """TE's older checkpoint asks for a tensor-parallel RNG tracker; there is none here (no dropout)."""

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        pass


def checkpoint(function, *args):
    """Full activation recomputation through Transformer Engine's own checkpoint, which keeps the
    FP8 state right (the recompute runs in FP8, with the forward's scales, and records no amax);
    torch's checkpoint recomputes outside ``fp8_autocast``. UNTESTED without CUDA and TE here:
    both signatures TE has had are handled (keyword arguments since 1.5, positional before)."""
    import inspect

    te = _require()
    fn = getattr(te, "checkpoint", None) or te.distributed.checkpoint
    params = inspect.signature(fn).parameters
    if "distribute_saved_activations" in params and \
            params["distribute_saved_activations"].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return fn(function, False, _NoRngTracker, None, *args)
    kwargs = {"distribute_saved_activations": False}
    if "use_reentrant" in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs["use_reentrant"] = False
    return fn(function, *args, **kwargs)


def _fp8_context(te, recipe):
    """TE's FP8 autocast: ``te.autocast(recipe=...)`` in current releases, ``te.fp8_autocast(fp8_recipe=...)``
    (deprecated there) in older ones."""
    import inspect

    current = getattr(te, "autocast", None)
    if current is not None and "recipe" in inspect.signature(current).parameters:
        return current(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


@contextlib.contextmanager
def autocast(device_type: str, cfg: DelayedScalingConfig = RECIPE, first_microbatch: bool | None = None):
    """bf16 autocast for the non-FP8 parts, TE's FP8 autocast with delayed scaling for its modules;
    ``first_microbatch`` tells TE's Linear whether to cast its weight to FP8 afresh in this forward."""
    global _first_microbatch
    te = _require()
    previous, _first_microbatch = _first_microbatch, first_microbatch
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16), _fp8_context(te, te_recipe(cfg)):
            yield
    finally:
        _first_microbatch = previous
