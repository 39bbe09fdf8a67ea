"""Which model spec builds a run's model: the built-in Transformer's for a ``ModelConfig``, the user's
(imported from ``[model] spec``) for a ``SpecModel``. The one dispatch between the two; everything that
builds or trains a run's model asks ``spec_of``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache

from mutransfer.config import ConfigError, ModelConfig, SpecModel, parse, updated
from mutransfer.infer_roles import infinite_dims
from mutransfer.parametrization import RoleMap
from mutransfer.presets import at_depth as preset_at_depth
from mutransfer.presets import at_width as preset_at_width
from mutransfer.spec import ModelSpec, load_spec
from mutransfer.transformer_spec import transformer_spec

SPEC_KEYS = ("spec", "args", "roles", "width", "depth", "tokenizer")  # what [model] takes with a spec


def spec_of(model: ModelConfig | SpecModel) -> ModelSpec:
    """The spec that builds ``model``."""
    if isinstance(model, SpecModel):
        spec = _loaded(model.spec, json.dumps(model.args, sort_keys=True))
        return spec if model.roles is None else replace(spec, roles=model.roles)
    return transformer_spec(model)


@cache
def _loaded(target: str, args: str, where: str = "model.spec") -> ModelSpec:
    """One import and one factory call per process and (target, args); errors name ``where``."""
    return load_spec(target, json.loads(args), where=where)


def _positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} = {value!r} must be a positive integer")
    return value


def spec_model(table: dict, where: str) -> SpecModel:
    """``[model]`` with ``spec = "package.module:factory"``: the factory imported and called (an error
    naming ``model.spec`` when it cannot be), width and depth defaulting to the spec's own."""
    unknown = sorted(set(table) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}.model: {unknown} not allowed with model.spec; allowed: {list(SPEC_KEYS)}")
    args = table.get("args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}.model.args: expected a table of the factory's keyword arguments")
    spec = _loaded_checked(table["spec"], args, f"{where}.model.spec")
    roles = table.get("roles")
    if roles is not None:
        if not isinstance(roles, dict):
            raise ConfigError(f"{where}.model.roles: expected a table of 'pattern' = 'role' entries")
        spec = replace(spec, roles=RoleMap(roles))
    width = _positive(table.get("width", spec.width), f"{where}.model.width")
    depth = _positive(table.get("depth", spec.depth), f"{where}.model.depth")
    check_spec(spec, width, depth, where)
    if spec.vocab_size is None:
        raise ConfigError(f"{where}.model.spec = {table['spec']!r}: the spec gives no vocab_size (needed to check "
                          "the data's tokenizer)")
    data = {"spec": table["spec"], "args": args, "roles": roles, "d_model": width, "n_layers": depth,
            "head_dim": spec.shape(width, depth).head_dim, "vocab_size": spec.vocab_size,
            "max_seq_len": spec.max_seq_len or 4096, "tokenizer": table.get("tokenizer", "byte")}
    return parse(SpecModel, data, f"{where}.model")


def check_spec(spec: ModelSpec, width: int, depth: int, where: str) -> None:
    """Before any compute, on the meta device: the width changes the model, and the role map gives
    every parameter exactly one role (errors list every name)."""
    import torch

    infinite_dims(spec.build, width, depth)
    with torch.device("meta"):
        model = spec.build(width, depth)
    spec.roles.check([n for n, _ in model.named_parameters()], where=f"{where}.model.roles")


def _loaded_checked(target, args: dict, where: str) -> ModelSpec:
    if not isinstance(target, str):
        raise ConfigError(f"{where} = {target!r}: expected 'package.module:factory'")
    try:
        key = json.dumps(args, sort_keys=True)
    except TypeError as e:
        raise ConfigError(f"{where}: args are not plain values ({e})") from None
    return _loaded(target, key, where)


def at_width(model: ModelConfig | SpecModel, width: int) -> ModelConfig | SpecModel:
    """The same model family at another width (the built-in's rule, or the spec's build)."""
    if isinstance(model, SpecModel):
        head_dim = spec_of(model).shape(width, model.n_layers).head_dim
        return updated(model, f"width {width}", d_model=width, head_dim=head_dim)
    return preset_at_width(model, width)


def at_depth(model: ModelConfig | SpecModel, depth: int) -> ModelConfig | SpecModel:
    """The same model with ``depth`` blocks."""
    if isinstance(model, SpecModel):
        return updated(model, f"depth {depth}", n_layers=_positive(depth, "depth"))
    return preset_at_depth(model, depth)
