"""Configs are plain frozen dataclasses, read from TOML tables with every field checked.

Bad input fails here, before any compute, with the field's dotted name and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config value that is wrong; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape (RECIPE section 1)."""

    vocab_size: int  # model vocabulary (padded)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_base: float = 500_000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    tokenizer: str = "byte"

    def validate(self, where: str = "model") -> ModelConfig:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)} must be positive")
        if self.d_model % self.head_dim:
            raise ConfigError(f"{where}.d_model = {self.d_model} is not divisible by "
                              f"{where}.head_dim = {self.head_dim}")
        if self.n_heads * self.head_dim != self.d_model:
            raise ConfigError(f"{where}.n_heads * head_dim = {self.n_heads * self.head_dim} must equal "
                              f"{where}.d_model = {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{where}.n_heads = {self.n_heads} is not a multiple of "
                              f"{where}.n_kv_heads = {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim = {self.head_dim} must be even for RoPE")
        return self

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class ParamConfig:
    """Which parametrization, and the base shape the base hyperparameters belong to."""

    parametrization: str = "mup"  # xmodel | mup | sp
    d_base: int = 256
    depth_base: int = 48
    depth_alpha: float = 0.5  # residual branch ~ (L0/L)^a: 0.5 Depth-muP, 1.0 CompleteP

    def validate(self, where: str = "param") -> ParamConfig:
        from mutransfer.parametrization import PARAMETRIZATIONS

        if self.parametrization not in PARAMETRIZATIONS:
            raise ConfigError(f"{where}.parametrization = {self.parametrization!r} is not allowed; "
                              f"choose one of {list(PARAMETRIZATIONS)}")
        if self.d_base <= 0 or self.depth_base <= 0:
            raise ConfigError(f"{where}.d_base and {where}.depth_base must be positive")
        if not 0.5 <= self.depth_alpha <= 1.0:
            raise ConfigError(f"{where}.depth_alpha = {self.depth_alpha} must lie in [0.5, 1.0]")
        return self


@dataclass(frozen=True)
class HParams:
    """Base hyperparameters: the values at the base width and depth (RECIPE section 2 defaults).

    The muP table turns them into per-group values at any shape; these are what a sweep tunes
    and what ``freeze`` writes.
    """

    lr: float = 0.01  # eta
    init_std: float = 0.1  # sigma
    alpha_in: float = 12.0
    alpha_out: float = 1.0
    alpha_res: float = 1.4
    weight_decay: float = 0.1  # lambda
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_eps: float = 1e-7

    def validate(self, where: str = "hparams") -> HParams:
        for name in ("lr", "init_std", "alpha_in", "alpha_out", "alpha_res", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)} must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{where}.weight_decay and {where}.grad_clip must be >= 0")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)} must lie in [0, 1)")
        return self


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_mapping(cls, data: dict | None, where: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        ann = hints[name]
        if dataclasses.is_dataclass(ann) and isinstance(value, dict):
            value = from_mapping(ann, value, f"{where}.{name}")
        elif not _type_ok(value, ann):
            raise ConfigError(f"{where}.{name} = {value!r} has the wrong type; expected {ann}")
        if hints[name] is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    return cls(**kwargs)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


@dataclass(frozen=True)
class RunShape:
    """A model with its parametrization: what ``plan`` and the trainers build."""

    model: ModelConfig
    param: ParamConfig = field(default_factory=ParamConfig)
