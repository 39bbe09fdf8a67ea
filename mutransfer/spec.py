"""A model spec: everything mutransfer needs to know about a model, in one place.

In the spirit of torchtitan's ``TrainSpec``: whatever touches a model -- building it at a width and
depth, the muP role of each parameter, its repeated blocks, its loss, where the coordinate check
taps it, how the table's forward multipliers reach it -- goes through its ``ModelSpec``, so no other
module knows a parameter or submodule name. The built-in Transformer is one spec
(``mutransfer.transformer_spec``); a user's nanoGPT GPT or HuggingFace Llama is another.

Forward multipliers reach a model the user does not want to edit through forward hooks
(``Multipliers``): the embedding output times alpha_in, the readout's *input* times the logit
multiplier (as mup's ``MuReadout`` does, so a readout bias is not scaled), each residual branch's
output projection times its branch multiplier, and the attention softmax scale written to an
attribute the model's attention reads. Hooks live on modules, not tensors: deepcopy, state dicts,
FSDP2 and torch.compile are unaffected.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mutransfer.config import ConfigError
from mutransfer.parametrization import ForwardMultipliers, RoleMap
from mutransfer.step import model_loss

__all__ = ["ModelSpec", "Multipliers", "SpecShape", "load_spec", "modules_matching", "mup_spec"]

# Coordinate-check kinds a spec may tap (mutransfer.coord); "attn_logits" needs a module called with
# (q, k) that holds its softmax scale as ``scale``.
TAP_KINDS = ("embedding", "attn_out", "ffn_out", "residual", "attn_logits", "output_logits")


@dataclass(frozen=True)
class SpecShape:
    """The shape variables of the muP rules for a spec model: width, depth and head dim."""

    d_model: int  # width d
    n_layers: int  # depth L (number of blocks)
    head_dim: int  # for the attention softmax scale


def modules_matching(model: nn.Module, pattern: str) -> list[str]:
    """Names of the submodules whose name matches ``pattern`` (``re.search``), in module order."""
    regex = re.compile(pattern)
    return [name for name, _ in model.named_modules() if name and regex.search(name)]


@dataclass(frozen=True)
class Multipliers:
    """Where the table's forward multipliers act on a model, as module-name patterns (``re.search``).

    embedding: modules whose output is multiplied by alpha_in (the token embedding).
    readout: the output layer; its input is multiplied by the logit multiplier (alpha_out/m under muP).
    residual_attn / residual_ffn: the last projection of each attention / MLP branch; its output is
    multiplied by the branch multiplier (the depth rule).
    attn_scale: (module pattern, attribute) -- the attribute every matching attention module reads
    as its softmax scale (HuggingFace Llama: ``("self_attn$", "scaling")``); None leaves the model's own.
    """

    embedding: str | None = None
    readout: str | None = None
    residual_attn: str | None = None
    residual_ffn: str | None = None
    attn_scale: tuple[str, str] | None = None

    def sites(self, model: nn.Module) -> dict[str, list[str]]:
        """Multiplier -> the module names it acts on; an error naming the field when a pattern matches none."""
        out = {}
        for key in ("embedding", "readout", "residual_attn", "residual_ffn"):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            names = modules_matching(model, pattern)
            if not names:
                raise ConfigError(f"model spec multipliers.{key} = {pattern!r} matches no module of "
                                  f"{type(model).__name__}")
            out[key] = names
        if self.readout is not None and len(out["readout"]) != 1:
            raise ConfigError(f"model spec multipliers.readout = {self.readout!r} must match one module; "
                              f"it matches {out['readout']}")
        if self.attn_scale is not None:
            pattern, attribute = self.attn_scale
            names = modules_matching(model, pattern)
            missing = [n for n in names if not hasattr(model.get_submodule(n), attribute)]
            if not names or missing:
                raise ConfigError(f"model spec multipliers.attn_scale = {self.attn_scale!r}: "
                                  + (f"modules {missing} have no attribute {attribute!r}" if names
                                     else "the pattern matches no module"))
            out["attn_scale"] = names
        return out

    def apply(self, model: nn.Module, mult: ForwardMultipliers) -> None:
        """Register the hooks (and set the softmax scale) on a freshly built model."""
        sites = self.sites(model)
        factors = {"embedding": mult.embedding, "residual_attn": mult.residual_attn,
                   "residual_ffn": mult.residual_ffn}
        for key, factor in factors.items():
            for name in sites.get(key, ()):
                model.get_submodule(name).register_forward_hook(_scale_output(factor))
        for name in sites.get("readout", ()):
            model.get_submodule(name).register_forward_pre_hook(_scale_input(mult.logits))
        for name in sites.get("attn_scale", ()):
            setattr(model.get_submodule(name), self.attn_scale[1], float(mult.attn_scale))


class _scale_output:
    """Forward hook: output x factor (a class, not a closure, so a model with it deep-copies and pickles)."""

    def __init__(self, factor: float):
        self.factor = float(factor)

    def __call__(self, module, args, output):
        return output * self.factor


class _scale_input:
    """Forward pre-hook: first input x factor."""

    def __init__(self, factor: float):
        self.factor = float(factor)

    def __call__(self, module, args):
        return (args[0] * self.factor, *args[1:])


def _default_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@dataclass(frozen=True)
class ModelSpec:
    """A model family for mutransfer: see the module docstring.

    build: ``build(width, depth) -> nn.Module``, called under a ``torch.device`` context (the meta
      device when ``meta_build``); its parameters are then initialised from the muP table.
    roles: parameter-name pattern -> role (``mutransfer.parametrization.ROLES``); every parameter
      must match exactly one. None: inferred from the shapes at ``width`` and 2 x ``width``
      (``mutransfer.infer_roles``; hidden matrices then get the generic ``hidden`` role).
    width, depth: the model's own (proxy) shape; the default base width and depth of the rules.
    head_dim: the attention head dim at a width (an int when it stays fixed), for the softmax scale.
    multipliers: where the forward multipliers act (``Multipliers``), or a function
      ``(model, ForwardMultipliers) -> None`` for a model that takes them natively.
    loss: ``(model, x, y) -> mean loss``; default ``model(x, y)``.
    logits: ``(model, x) -> logits (batch, seq, vocab)``; default ``model(x)``. The coordinate
      check trains through these, so a hook on the readout sees every logit.
    blocks: pattern of the repeated blocks' module names (FSDP2 units, compile,
      the coordinate check's layer index and residual stream).
    taps: extra coordinate-check taps, kind -> module pattern; the multiplier sites give the rest.
    fuse_key: parameter name -> the name of the fused matrix it belongs to (fused Muon), or None.
    vocab_size: the largest token id + 1 the model accepts (checked against the data's tokenizer).
    max_seq_len: the longest sequence it takes (position embeddings, RoPE tables); None: 4096.
    meta_build: build on the meta device and give it storage afterwards (``to_empty``): only for a
      model that recomputes its buffers in ``to_empty``.
    """

    name: str
    build: Callable[[int, int], nn.Module]
    roles: RoleMap | Mapping[str, str] | None
    width: int
    depth: int
    head_dim: int | Callable[[int], int]
    multipliers: Multipliers | Callable[[nn.Module, ForwardMultipliers], None]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = model_loss
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _default_logits
    blocks: str | None = None
    taps: Mapping[str, str] = field(default_factory=dict)
    fuse_key: Callable[[str], str] | None = None
    vocab_size: int | None = None
    max_seq_len: int | None = None
    meta_build: bool = False

    def __post_init__(self):
        if self.roles is None:  # inferred from shapes at two widths, as mup's set_base_shapes does
            from mutransfer.infer_roles import infer_roles

            object.__setattr__(self, "roles", infer_roles(self.build, self.width, self.depth))
        if not isinstance(self.roles, RoleMap):
            object.__setattr__(self, "roles", RoleMap(self.roles))
        for key in ("width", "depth"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model spec {self.name!r}: {key} = {value!r} must be a positive integer")
        unknown = sorted(set(self.taps) - set(TAP_KINDS))
        if unknown:
            raise ConfigError(f"model spec {self.name!r}: taps {unknown} are not coordinate-check kinds; "
                              f"choose from {list(TAP_KINDS)}")

    def shape(self, width: int, depth: int) -> SpecShape:
        head_dim = self.head_dim(width) if callable(self.head_dim) else self.head_dim
        return SpecShape(d_model=width, n_layers=depth, head_dim=int(head_dim))

    def apply_multipliers(self, model: nn.Module, mult: ForwardMultipliers) -> None:
        if isinstance(self.multipliers, Multipliers):
            self.multipliers.apply(model, mult)
        else:
            self.multipliers(model, mult)

    def block_names(self, model: nn.Module) -> list[str]:
        """The repeated blocks' module names, in order (outermost matches only)."""
        if self.blocks is None:
            return []
        names = modules_matching(model, self.blocks)
        return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]

    def tap_modules(self, model: nn.Module) -> dict[str, str]:
        """Module name -> coordinate-check kind: the multiplier sites, the blocks and ``taps``."""
        out: dict[str, str] = {}
        if isinstance(self.multipliers, Multipliers):
            from_sites = {"embedding": "embedding", "residual_attn": "attn_out", "residual_ffn": "ffn_out",
                          "readout": "output_logits"}
            for key, kind in from_sites.items():
                pattern = getattr(self.multipliers, key)
                for name in modules_matching(model, pattern) if pattern else ():
                    out[name] = kind
        for name in self.block_names(model):
            out[name] = "residual"
        for kind, pattern in self.taps.items():
            for name in modules_matching(model, pattern):
                out[name] = kind
        return out


def load_spec(target: str, kwargs: Mapping | None = None, where: str = "model.spec") -> ModelSpec:
    """``"package.module:factory"`` imported and called with ``kwargs``; it must return a ModelSpec.
    The module is looked up on ``sys.path`` with the current directory first, as ``python -m`` does.

    Every failure is a ConfigError naming ``where``: a malformed target, a module that does not
    import, a missing factory, a factory that raises or returns something else.
    """
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"{where} = {target!r}: expected 'package.module:factory'")
    module_name, attr = target.split(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m`` does: a user's module beside the config imports
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- any import failure is the user's input, reported by name
        raise ConfigError(f"{where} = {target!r}: module {module_name!r} does not import "
                          f"({type(e).__name__}: {e})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"{where} = {target!r}: module {module_name!r} has no {attr!r}")
    if isinstance(factory, ModelSpec):
        if kwargs:
            raise ConfigError(f"{where} = {target!r} is a ModelSpec, not a factory: it takes no arguments")
        return factory
    try:
        spec = factory(**dict(kwargs or {}))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where} = {target!r}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{where} = {target!r} returned {type(spec).__name__}, not a mutransfer ModelSpec")
    return spec


def mup_spec(build: Callable[[int, int], nn.Module], width: int, depth: int, head_dim: int | Callable[[int], int],
             *, name: str = "mup-model", multipliers: Multipliers | None = None, **fields) -> ModelSpec:
    """A spec for a model already written for microsoft mup, used as it is: its roles read once from
    its shapes (``width`` against 2 x ``width``: mup's base and delta), and no logit hook -- its
    ``MuReadout`` already multiplies its input by ``output_mult / width_mult`` -- unless
    ``multipliers`` asks for some (e.g. the softmax scale). ``fields`` go to ``ModelSpec``; give
    ``taps={"output_logits": <readout pattern>}`` for the coordinate check's logits and readout update.
    """
    return ModelSpec(name=name, build=build, roles=None, width=width, depth=depth, head_dim=head_dim,
                     multipliers=multipliers or Multipliers(), **fields)
