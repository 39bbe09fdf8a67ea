"""mutransfer: muP hyperparameter transfer for any PyTorch language model.

The Python API (``docs/any_model.md``)::

    import mutransfer as mt
    spec = mt.ModelSpec(name=..., build=lambda width, depth: ..., roles={...}, width=..., depth=...,
                        head_dim=..., multipliers=mt.Multipliers(...))
    result = mt.coord_check(spec, widths=[64, 128, 256, 512])      # .passed, .verdict, .exit_status
    model = mt.make_model(spec, width=512)                           # muP init and forward multipliers
    groups = mt.param_groups(spec, model, {"lr": 3e-3})             # for the user's own torch.optim.AdamW

Names are imported on first use, so ``import mutransfer`` itself loads no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelSpec": "mutransfer.spec",
    "Multipliers": "mutransfer.spec",
    "load_spec": "mutransfer.spec",
    "mup_spec": "mutransfer.spec",
    "infer_roles": "mutransfer.infer_roles",
    "RoleMap": "mutransfer.parametrization",
    "ROLES": "mutransfer.parametrization",
    "HParams": "mutransfer.config",
    "ParamConfig": "mutransfer.config",
    "make_model": "mutransfer.api",
    "param_groups": "mutransfer.api",
    "coord_check": "mutransfer.api",
    "apply_lock": "mutransfer.api",
    "wsd": "mutransfer.schedule",
    "CoordResult": "mutransfer.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mutransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
