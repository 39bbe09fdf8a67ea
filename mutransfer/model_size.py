"""Whether a model can be built at all, and whether it can be built on this machine.

A width or depth with a few zeros too many used to surface after the run had started, as torch's
"Storage size calculation overflowed" or an allocator failure (in a sweep, only in the worker
logs, once per trial). Two checks, both before any compute, both naming the shape's fields:

- ``ModelConfig`` refuses, as it is parsed, a shape whose fp32 weights need more bytes than an
  int64 counts: no tensor that large can exist. Every command parses its shape, ``plan`` too.
- ``check_fits_machine`` refuses, in every command that trains (train, sweep, transfer-check,
  coord-check), a model whose fp32 weights alone exceed this machine's memory (RAM plus every
  visible GPU). Training needs several times the weights (gradients, optimizer states,
  activations), so a model refused here could never run; ``plan`` plans any size.
"""

from __future__ import annotations

import os

from mutransfer.config import FP32_BYTES, INT64_MAX, ConfigError, HParams, ModelConfig, RunShape


def parameter_count(shape: RunShape) -> int:
    """Parameters of the model of ``shape``: exact for the built-in Transformer; a spec's model is
    built on the meta device (nothing allocated) at depths 1 and 2 and extrapolated in depth."""
    if isinstance(shape.model, ModelConfig):
        return shape.model.num_params
    depth = shape.model.n_layers
    if depth <= 2:
        return _meta_count(shape, depth)
    one, two = _meta_count(shape, 1), _meta_count(shape, 2)
    return one + (depth - 1) * (two - one)


def _meta_count(shape: RunShape, depth: int) -> int:
    from mutransfer.build import build
    from mutransfer.specs import spec_of

    model = shape.model
    try:
        built = build(spec_of(model), model.d_model, depth, shape.param, HParams(), device="meta")
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise ConfigError(f"{_fields(model)}: a weight of this model needs more bytes than an int64 counts, so "
                          "no such model can be built; choose a smaller width or depth") from None
    return sum(p.numel() for p in built.parameters())


def machine_memory() -> int:
    """Bytes of memory on this machine: physical RAM plus every visible GPU's."""
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else 0
    return ram + gpus


def check_fits_machine(shape: RunShape, where: str = "", share: float = 1.0) -> int:
    """The parameter count of ``shape``, or ConfigError when this machine's ``share`` of its fp32
    weights (1: a whole copy; a fraction: the shards it holds) exceeds the machine's memory.
    ``where`` says which shape of a command it is (e.g. ``transfer.values: width 4096``)."""
    n = parameter_count(shape)
    need = FP32_BYTES * n * share
    if FP32_BYTES * n > INT64_MAX:
        raise ConfigError(f"{_fields(shape.model, where)}: {n:.3g} parameters need more bytes than an int64 "
                          "counts, so no such model can be built; choose a smaller width or depth")
    have = machine_memory()
    if need > have:
        held = "" if share == 1.0 else f" (this machine's share: {share:g} of them)"
        raise ConfigError(f"{_fields(shape.model, where)}: {n:.3g} parameters, {_gib(need)} of fp32 weights "
                          f"alone{held}, more than this machine's memory ({_gib(have)}, RAM and GPUs together); "
                          "training needs several times the weights, so this model cannot run here; choose a "
                          "smaller width or depth")
    return n


def _fields(model, where: str = "") -> str:
    fields = f"model.d_model = {model.d_model}, model.n_layers = {model.n_layers}"
    return f"{fields} ({where})" if where else fields


def _gib(n: float) -> str:
    return f"{n / 2**30:,.0f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
