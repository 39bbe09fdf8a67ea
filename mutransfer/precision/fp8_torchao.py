"""FP8 with torchao's float8 training: the other production engine (RECIPE section 5).

Dynamic (per-step, tensorwise) scaling rather than TE's delayed scaling; works with FSDP2 and
torch.compile. ``convert_to_float8_training`` swaps ``nn.Linear`` for ``Float8Linear`` under the
same module name and keeps the same weight parameter. Its FP8 GEMM (``torch._scaled_mm``) needs
a CUDA GPU with compute capability >= 8.9, so this backend refuses to prepare a model elsewhere.
"""

from __future__ import annotations

from torch import nn

from mutransfer.precision.gpu import fp8_gpu_available

INSTALL = ('install torchao with pip install "mutransfer[torchao]"; its float8 training needs a CUDA GPU '
           "with compute capability >= 8.9 (Ada, Hopper or Blackwell)")


def _import_float8():
    try:
        import torchao.float8 as float8
    except Exception as e:
        raise ImportError(f"precision 'fp8-torchao' is unavailable: torchao.float8 cannot be imported "
                          f"({type(e).__name__}: {e}); {INSTALL}") from e
    return float8


def available() -> tuple[bool, str]:
    return fp8_gpu_available("fp8-torchao", _import_float8, INSTALL)


def _is_transformer_linear(module: nn.Module, fqn: str) -> bool:
    """The transformer GEMMs: plain nn.Linear (the tied output layer is a functional F.linear)."""
    return type(module) is nn.Linear


def prepare(model: nn.Module) -> nn.Module:
    ok, why = available()
    if not ok:
        raise (ImportError if "cannot be imported" in why else RuntimeError)(why)
    float8 = _import_float8()
    return float8.convert_to_float8_training(model, module_filter_fn=_is_transformer_linear)
