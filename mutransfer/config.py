"""The typed config layer: every table of every input is a pydantic model, checked before compute.

One base class (``Config``) with one policy for all inputs -- TOML configs, sweep files, lock
files, ``--set`` overrides and command-line options: unknown keys are refused, numbers must be
finite (NaN and infinities are refused), types are strict (a string is not a number, a bool is not
an integer), and ranges are declared on the field. ``parse`` turns any validation failure into one
``ConfigError`` whose message names the field path, e.g. ``train.grad_clip: input should be a
finite number (got nan)``. The JSON schema of every model is free (``docs/config.md`` is made
from it).

Shared tables have one meaning everywhere: ``[model]``/``[param]`` (the shape), ``[hparams]`` (the
base hyperparameters) and ``[train]`` (``TrainSettings``: how a run trains -- precision, device,
seeds, evaluation, divergence rule, checkpointing, compile). A proxy run's ``[train]`` adds its
budget (``ProxyTrain``); a full-scale run's budget is its ``[[stages]]``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The closed vocabularies every table shares (Literal types below name them in errors and schema).
PARAMETRIZATIONS = ("xmodel", "mup", "sp")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("fp32", "bf16", "fp8-emulated", "fp8-te", "fp8-torchao")
CHECKPOINTING = ("none", "full", "selective")

Parametrization = Literal["xmodel", "mup", "sp"]
OptimizerName = Literal["adamw", "muon"]
Precision = Literal["fp32", "bf16", "fp8-emulated", "fp8-te", "fp8-torchao"]
Checkpointing = Literal["none", "full", "selective"]

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # a moving-average coefficient


class ConfigError(ValueError):
    """A config value that is wrong; the message names the field."""


class Config(BaseModel):
    """Base of every config table: frozen, strict, finite, no unknown keys."""

    # A field's docstring (the string under it) is its description in the schema, so `mutransfer schema`
    # and docs/config.md say what each field means from the model itself.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True,
                              use_attribute_docstrings=True)


C = TypeVar("C", bound=BaseModel)


def _path(where: str, loc: tuple) -> str:
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "nullable[", "union[")):
            continue  # pydantic's names for union members; the field path says enough
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(cls: type[BaseModel], err: dict) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        parent = _model_at(cls, err["loc"][:-1])
        allowed = sorted(parent.model_fields) if parent is not None else None
        msg = "unknown field" + (f"; allowed: {allowed}" if allowed else "")
    elif err["type"] == "missing":
        msg = "missing (required)"
    return msg[0].lower() + msg[1:] if msg else msg


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class at ``loc`` inside ``cls`` (for listing allowed keys), if it is one."""
    import typing

    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        for arg in (ann, *typing.get_args(ann), *(a for t in typing.get_args(ann) for a in typing.get_args(t))):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_errors(cls: type[BaseModel], error: ValidationError, where: str) -> str:
    """One line per problem: ``field.path: what is wrong (got value)``."""
    lines = []
    for err in error.errors():
        line = f"{_path(where, err['loc']) or where}: {_message(cls, err)}"
        if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
            line += f" (got {err['input']!r})"
        lines.append(line)
    return "; ".join(lines)


def parse(cls: type[C], data: Any, where: str) -> C:
    """Validate ``data`` (a mapping, usually from TOML or JSON) as ``cls``; ConfigError names the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table (a mapping of keys to values), got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(cls, e, where)) from None


def updated(obj: C, where: str = "", **changes) -> C:
    """A copy of ``obj`` with ``changes``, validated like any input (``model_copy`` does not validate)."""
    return parse(type(obj), {**obj.model_dump(), **changes}, where or type(obj).__name__)


def to_dict(obj: BaseModel) -> dict:
    return obj.model_dump()


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e})") from e


# ---------------------------------------------------------------- --set KEY=VALUE, for every command


def parse_value(text: str):
    """A TOML value (``false``, ``3``, ``1e-5``, ``"x"``, ``[1, 2]``, ``nan``); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str, tables: tuple[str, ...] | None = None) -> None:
    """``a.b.c=value`` into ``raw`` in place; a list of tables is indexed by position or by ``name``.

    ``tables``: the allowed first keys (a config's tables), for an error that lists them.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.precision=bf16")
    key, text = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key part in {key!r}")
    if tables is not None and parts[0] not in tables:
        raise ConfigError(f"--set {key}: unknown table {parts[0]!r}; allowed: {list(tables)}")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = parse_value(text)
    else:
        node[last] = parse_value(text)


def apply_overrides(raw: dict, assignments, tables: tuple[str, ...] | None = None) -> dict:
    for assignment in assignments or ():
        apply_override(raw, assignment, tables)
    return raw


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise ConfigError(f"--set: {where} names no entry; use an index < {len(items)} or a name from {names}")


# ---------------------------------------------------------------- the shape


FP32_BYTES = 4
INT64_MAX = 2**63 - 1  # torch counts a tensor's bytes in an int64


class ModelConfig(Config):
    """Decoder-only transformer shape (RECIPE section 1). In a config file ``[model]`` also takes
    ``preset`` (tiny, proxy-20m, xmodel25-1.3b; the other keys override its fields), ``width`` (the
    preset's family at that width) and ``depth`` (that many blocks).
    """

    vocab_size: PosInt
    """model vocabulary (padded)"""
    d_model: PosInt
    """width d"""
    n_layers: PosInt
    """depth L"""
    n_heads: PosInt
    """query heads; n_heads * head_dim = d_model"""
    n_kv_heads: PosInt
    """key/value heads (GQA); divides n_heads"""
    head_dim: PosInt
    """even (RoPE)"""
    ffn_dim: PosInt
    """SwiGLU hidden width"""
    rope_base: PosFloat = 500_000.0
    """RoPE base frequency theta (RECIPE: 500,000)"""
    max_seq_len: PosInt = 4096
    """longest sequence the model accepts"""
    norm_eps: PosFloat = 1e-5
    """RMSNorm epsilon"""
    tokenizer: str = "byte"
    """byte | deepseek-v3 | path to a tokenizer.json"""

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.d_model % self.head_dim:
            raise ValueError(f"d_model = {self.d_model} is not divisible by head_dim = {self.head_dim}")
        if self.n_heads * self.head_dim != self.d_model:
            raise ValueError(f"n_heads * head_dim = {self.n_heads * self.head_dim} must equal "
                             f"d_model = {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads = {self.n_heads} is not a multiple of n_kv_heads = {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim} must be even for RoPE")
        if FP32_BYTES * self.num_params > INT64_MAX:  # torch: "Storage size calculation overflowed"
            raise ValueError(f"d_model = {self.d_model}, n_layers = {self.n_layers} (ffn_dim = {self.ffn_dim}, "
                             f"vocab_size = {self.vocab_size}) make {self.num_params:.3g} parameters, "
                             f"{FP32_BYTES * self.num_params:.3g} bytes in fp32: more than an int64 counts, so no "
                             "such model can be built; choose a smaller width or depth")
        return self

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def num_params(self) -> int:
        """Parameters of the built-in Transformer of this shape (exact: tied embedding, bias-free
        projections, two RMSNorms per block and a final one); Python integers never overflow."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        block = 2 * d * q + 2 * d * kv + 3 * d * self.ffn_dim + 2 * d
        return self.vocab_size * d + self.n_layers * block + d


SpecArg = int | float | bool | str | list[int | float | bool | str]


class SpecModel(Config):
    """``[model]`` of a user's own model: ``spec = "package.module:factory"`` returns its
    ``mutransfer.spec.ModelSpec`` (called with ``args``); ``width`` and ``depth`` in the table give
    ``d_model`` and ``n_layers`` (default: the spec's own). ``head_dim``, ``vocab_size`` and
    ``max_seq_len`` are read from the spec when the config is loaded, so the file need not repeat them.
    """

    spec: str
    """"package.module:factory", imported in every process that builds the model"""
    args: dict[str, SpecArg] = Field(default_factory=dict)
    """keyword arguments of the factory"""
    roles: dict[str, str] | None = None
    """[model.roles]: pattern -> role, replacing the spec's role map"""
    d_model: PosInt
    """width d"""
    n_layers: PosInt
    """depth L"""
    head_dim: PosInt
    """at this width (the softmax scale 1/d_head)"""
    vocab_size: PosInt
    """from the spec: the tokens the model accepts"""
    max_seq_len: PosInt = 4096
    """from the spec: the longest sequence it takes"""
    tokenizer: str = "byte"
    """byte | deepseek-v3 | path to a tokenizer.json"""


class ParamConfig(Config):
    """Which parametrization, and the base shape the base hyperparameters belong to."""

    parametrization: Parametrization = "mup"
    """the muP table's column (mutransfer.parametrization): which rule scales each group with width and depth"""
    d_base: PosInt = 256
    """the width the base hyperparameters belong to (muP scales every group from it)"""
    depth_base: PosInt = 48
    """the depth the base hyperparameters belong to (the residual scaling starts from it)"""
    # residual branch ~ (L0/L)^a: 0.5 Depth-muP, 1.0 CompleteP
    depth_alpha: Annotated[float, Field(ge=0.5, le=1.0)] = 0.5
    """residual branch x (depth_base / L)^depth_alpha: 0.5 Depth-muP, 1.0 CompleteP"""


class HParams(Config):
    """Base hyperparameters: the values at the base width and depth (RECIPE section 2 defaults).

    The muP table turns them into per-group values at any shape; these are what a sweep tunes
    and what ``freeze`` writes. ``alpha_res_attn``/``alpha_res_ffn`` give the attention and FFN
    residual branches their own multipliers (the recipe's sweeps did); unset, both use ``alpha_res``.
    """

    lr: PosFloat = 0.01
    """eta"""
    init_std: PosFloat = 0.1
    """sigma"""
    alpha_in: PosFloat = 12.0
    """embedding output multiplier (alpha_in x embedding)"""
    alpha_out: PosFloat = 1.0
    """output logit multiplier (muP divides it by the width ratio d / d_base)"""
    alpha_res: PosFloat = 1.4
    """residual branch multiplier (h += alpha_res / sqrt(L) x branch)"""
    alpha_res_attn: PosFloat | None = None
    """the attention branch's own multiplier; unset: alpha_res"""
    alpha_res_ffn: PosFloat | None = None
    """the FFN branch's own multiplier; unset: alpha_res"""
    weight_decay: NonNegFloat = 0.1
    """lambda"""
    adam_beta1: Beta = 0.9
    """AdamW first-moment decay"""
    adam_beta2: Beta = 0.95
    """AdamW second-moment decay"""
    adam_eps: PosFloat = 1e-8
    """AdamW epsilon"""
    grad_clip: NonNegFloat = 1.0
    """0: no clipping"""
    muon_momentum: Beta = 0.95
    """Muon momentum"""
    muon_nesterov: bool = True
    """Muon with Nesterov momentum"""
    muon_ns_steps: PosInt = 5
    """Newton-Schulz iterations of Muon's orthogonalisation"""
    muon_eps: PosFloat = 1e-7
    """Muon's normalisation epsilon before Newton-Schulz"""

    @property
    def residual_attn(self) -> float:
        return self.alpha_res if self.alpha_res_attn is None else self.alpha_res_attn

    @property
    def residual_ffn(self) -> float:
        return self.alpha_res if self.alpha_res_ffn is None else self.alpha_res_ffn


def base_type(annotation) -> type | None:
    """The scalar type under Optional/Annotated (``float`` for ``PosFloat | None``), else None."""
    import typing

    if annotation in (int, float, bool, str):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Annotated:
        args = args[:1]
    found = {base_type(a) for a in args} - {None}
    return found.pop() if len(found) == 1 else None


# Base hyperparameters a sweep may search or a transfer check may set: the real-valued ones.
HPARAM_FLOAT_FIELDS = tuple(n for n, f in HParams.model_fields.items() if base_type(f.annotation) is float)


class RunShape(Config):
    """A model with its parametrization: what ``plan`` and the trainers build (the built-in
    Transformer's ``ModelConfig``, or a user's ``SpecModel``)."""

    model: ModelConfig | SpecModel
    param: ParamConfig = Field(default_factory=ParamConfig)


# ---------------------------------------------------------------- [train]: how a run trains


class TrainSettings(Config):
    """``[train]`` of every run -- proxy trial, transfer check, full-scale stage plan -- one meaning.

    device: ``auto`` (a GPU when one is visible), ``cpu``, ``cuda`` or ``cuda:N``.
    diverge_ratio: a training loss above this multiple of the first step's counts as diverged.
    activation_checkpointing: per block; ``selective`` saves the matmul and attention outputs and
    recomputes the cheap elementwise ops (mutransfer.model). loss_chunk_tokens: the cross entropy
    is computed this many tokens at a time, so (tokens x vocab) logits are never all live.
    """

    precision: Precision = "fp32"
    """fp32 | bf16 | fp8-emulated | fp8-te | fp8-torchao (mutransfer.precision)"""
    device: str = "auto"
    """auto (a GPU when one is visible) | cpu | cuda | cuda:N"""
    threads: PosInt | None = None
    """CPU intra-op threads; default: torch's choice"""
    seed: NonNegInt = 0
    """model initialisation"""
    data_seed: NonNegInt = 0
    """batch draws"""
    eval_every: PosInt = 50
    """steps between held-out evaluations"""
    eval_batches: PosInt = 4
    """held-out batches per evaluation"""
    eval_batch_size: PosInt = 16
    """sequences per held-out batch"""
    eval_micro_batch: PosInt | None = None
    """rows per evaluation forward; default: the whole batch"""
    eval_seq_len: PosInt | None = None
    """default: the (first) training sequence length"""
    diverge_ratio: Annotated[float, Field(gt=1)] = 4.0
    """a training loss above this multiple of the first step's counts as diverged"""
    activation_checkpointing: Checkpointing = "none"
    """none | full | selective (saves matmul and attention outputs, recomputes the elementwise ops), per block"""
    loss_chunk_tokens: PosInt = 8192
    """the cross entropy is computed this many tokens at a time (the logits of all tokens are never live at once)"""
    compile: bool = False
    """torch.compile each block (full-scale) / the model (proxy)"""

    @model_validator(mode="after")
    def _device(self) -> TrainSettings:
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ValueError(f"device = {d!r} is not allowed; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return self


class ProxyTrain(TrainSettings):
    """``[train]`` of a proxy run (sweep trial, transfer check): the shared settings plus its budget.

    LR follows WSD: linear warmup, constant, optional exponential decay to ``final_lr_ratio``.
    """

    steps: PosInt = 300
    """optimizer steps of each run"""
    batch_size: PosInt = 16
    """sequences per optimizer step"""
    micro_batch_size: PosInt | None = None
    """sequences per forward/backward (accumulated); default: the batch"""
    seq_len: PosInt = 128
    """tokens per sequence"""
    warmup: NonNegInt = 30
    """steps of linear LR warmup"""
    decay: NonNegInt = 0
    """last steps of exponential LR decay; 0: none (warmup-stable)"""
    final_lr_ratio: Annotated[float, Field(gt=0, le=1)] = 1 / 16
    """the LR factor the decay ends at"""
    optimizer: OptimizerName = "adamw"
    """adamw | muon (hidden matrices by Muon, the rest by AdamW)"""

    @model_validator(mode="after")
    def _budget(self) -> ProxyTrain:
        if self.warmup + self.decay > self.steps:
            raise ValueError(f"warmup = {self.warmup} + decay = {self.decay} must fit in steps = {self.steps}")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by micro_batch_size = "
                             f"{self.micro_batch_size}")
        return self

    @property
    def micro_batches(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def hparams_from(args_overrides: dict, base: HParams | None = None, where: str = "hparams") -> HParams:
    """HParams with overrides; unknown names, wrong types and bad numbers are errors naming the field."""
    base = base or HParams()
    if not isinstance(args_overrides, dict):
        raise ConfigError(f"{where}: expected a table")
    merged = {**base.model_dump(), **{k: v for k, v in args_overrides.items() if v is not None}}
    return parse(HParams, merged, where)


def finite(value: float, name: str) -> float:
    """A command-line number must be finite too (argparse's float() accepts 'nan' and 'inf')."""
    if not math.isfinite(value):
        raise ConfigError(f"{name}: input should be a finite number (got {value!r})")
    return value
