"""Roles from shapes, as microsoft mup's ``set_base_shapes`` infers them.

Where no role map is given, the model is built at two widths on the meta device (nothing is
allocated) and each parameter's dimensions are compared: a dimension that changes with the width is
"infinite" (mup's term). Two infinite dimensions: a hidden matrix. One, on a 2-D tensor: the token
embedding (an ``nn.Embedding``'s weight, or a readout tied to it) or the readout (any other layer,
mup's ``MuReadout``). One, on a 1-D tensor: a bias (named ``bias``) or a norm gain. None: ``keep``.
The result is an explicit role map -- one exact name per parameter -- read once, so nothing is
attached to tensors and the run sees plain data.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from mutransfer.config import ConfigError


def _built(build: Callable[[int, int], nn.Module], width: int, depth: int) -> nn.Module:
    with torch.device("meta"):
        return build(width, depth)


def infinite_dims(build: Callable[[int, int], nn.Module], width: int, depth: int) -> dict[str, tuple[bool, ...]]:
    """Parameter name -> which of its dimensions grow with the width (base ``width`` against 2x)."""
    base, delta = _built(build, width, depth), _built(build, 2 * width, depth)
    base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    delta_shapes = {n: tuple(p.shape) for n, p in delta.named_parameters()}
    if base_shapes.keys() != delta_shapes.keys():
        raise ConfigError(f"model build: its parameters differ between widths {width} and {2 * width}: "
                          f"{sorted(base_shapes.keys() ^ delta_shapes.keys())}")
    out = {n: tuple(a != b for a, b in zip(s, delta_shapes[n], strict=True)) for n, s in base_shapes.items()}
    if not any(any(v) for v in out.values()):
        raise ConfigError(f"model build: no parameter changes shape between widths {width} and {2 * width} (the "
                          f"same parameter shapes at widths [{width}, {2 * width}]); the build must use the width "
                          "it is given")
    return out


def infer_roles(build: Callable[[int, int], nn.Module], width: int, depth: int) -> dict[str, str]:
    """An exact role map (``^name$`` -> role) from shapes at two widths (module docstring)."""
    model = _built(build, width, depth)
    owners = {f"{m}.{p}" if m else p: module for m, module in model.named_modules()
              for p, _ in module.named_parameters(recurse=False)}
    roles = {}
    for name, inf in infinite_dims(build, width, depth).items():
        n_inf, ndim = sum(inf), len(inf)
        if n_inf == 2:
            role = "hidden"
        elif n_inf == 1 and ndim == 2:
            role = "embedding" if isinstance(owners[name], nn.Embedding) else "readout"
        elif n_inf == 1 and ndim == 1:
            role = "bias" if name.rsplit(".", 1)[-1] == "bias" else "norm_gain"
        elif n_inf == 0:
            role = "keep"
        else:
            raise ConfigError(f"inferring roles: {name} has {n_inf} dimensions that grow with width; "
                              "give a role map")
        roles[f"^{re.escape(name)}$"] = role
    return roles
