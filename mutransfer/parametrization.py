"""The one source of truth for muP: parameter roles and the role x optimizer rule table.

Every parameter gets a *role* from its name. A table maps (parametrization, role, optimizer)
to four rules -- init std, learning rate, weight decay, Adam eps -- written as the formula that
scales the *base* hyperparameter (the value tuned at the base width d_base and base depth L0).
Forward multipliers (embedding, residual branch, logits, attention softmax scale) are in the
same module. Nothing is attached to tensors: optimizers get plain parameter groups built here,
the model gets plain numbers, so FSDP2, torch.compile, deepcopy and checkpoints are unaffected.

Scaling variables: m = d / d_base (width multiplier), L = depth, L0 = base depth,
a = depth exponent of the residual branch (1/2: Depth-muP, 1: CompleteP).

Parametrizations
- ``xmodel``: the Xmodel-2.5 recipe exactly as it ran (MiniCPM-style constants).
- ``mup``: complete muP. Hidden inits sigma/sqrt(m) on both input and output side
  (Yang et al., Tensor Programs V, arXiv 2203.03466); hidden AdamW LR eta/m; Adam eps eps/m for
  every AdamW group -- embedding, norm gains and hidden matrices alike, since all their gradients
  shrink like 1/m (Everett et al., arXiv 2407.05872; measured in tests/test_mup_rules.py);
  independent weight decay, lambda*m with torch's decoupled AdamW so that lr*wd is width-free
  (Wortsman et al. arXiv 2309.14322; Everett et al.); norm gains without decay. Depth relative to
  L0 (Depth-muP, Yang et al. arXiv 2310.02244, a = 1/2; CompleteP, Dey et al. arXiv 2505.01618,
  a = 1): branch multiplier (L0/L)^a; everything inside a residual branch (hidden matrices and the
  block norm gains) LR (L/L0)^(a-1) and eps (L0/L)^a, as CompleteP's reference code does; the
  embedding and the final norm gain no depth factor. Hidden weight decay (L/L0)^(1-a): our own
  rule, not CompleteP's (its reference uses lambda*m), so that lr*wd -- hence AdamW's EMA timescale
  1/(lr*wd) (Wang & Aitchison, arXiv 2405.13698) -- is depth-free; the two agree at a = 1.
  Muon: RMS matching 0.2*sqrt(max(A, B)) with eta/sqrt(m), which keeps the spectral norm of an
  update, hence ||dW x||, width-free.
- ``sp``: the standard-parametrization control: fan-in init, one LR for every parameter, no
  width- or depth-dependent multipliers, softmax scale 1/sqrt(d_head). It coincides with ``mup``
  at the base shape except for the softmax scale, so the two differ only in how they scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch

from mutransfer.config import OPTIMIZERS, PARAMETRIZATIONS, ConfigError, HParams, ModelConfig, ParamConfig

__all__ = ["OPTIMIZERS", "PARAMETRIZATIONS", "ROLES", "Role", "RoleMap", "role_of", "resolve", "resolve_role",
           "resolve_all", "param_groups", "init_weights", "forward_multipliers", "scale_of", "describe_table",
           "ForwardMultipliers"]


class Role(StrEnum):
    EMBEDDING = "embedding"  # token embedding (tied or not): vector-like, width-free rules
    READOUT = "readout"  # an untied output layer (mup's MuReadout): the embedding's rules, logits x alpha_out/m
    POS_EMBEDDING = "pos_embedding"  # learned position embeddings: the embedding's rules
    ATTN_QKV = "attn_qkv"
    ATTN_OUT = "attn_out"
    FFN_IN = "ffn_in"
    FFN_OUT = "ffn_out"
    HIDDEN = "hidden"  # a hidden matrix of no named kind (roles inferred from shapes): attn_qkv's rules
    NORM_GAIN = "norm_gain"  # the norm gains inside the residual branches
    FINAL_NORM = "final_norm"  # the final norm gain, outside every residual branch
    BIAS = "bias"  # biases (any layer): zeros, a norm gain's LR and eps, no weight decay
    KEEP = "keep"  # left alone: the model's own init, trained with the base eta, lambda and eps unscaled


HIDDEN_MATRIX_ROLES = (Role.ATTN_QKV, Role.ATTN_OUT, Role.FFN_IN, Role.FFN_OUT, Role.HIDDEN)
ROLES = tuple(r.value for r in Role)

_WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    """A parameter's name without what torch.compile, FSDP1 and DDP wrappers add to it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class RoleMap:
    """Parameter name -> muP role by regular expressions (``re.search`` on the name).

    Every parameter must match exactly one pattern: a name that matches none, or more than one, is
    an error that lists every such name (``check``) -- never a guess. Patterns are plain data, so a
    role map can come from Python or from a config's ``[model.roles]`` table.
    """

    def __init__(self, patterns):
        items = list(patterns.items()) if hasattr(patterns, "items") else list(patterns)
        if not items:
            raise ConfigError("model.roles: empty role map; give at least one 'pattern = role' entry")
        compiled = []
        for pattern, role in items:
            if role not in ROLES:
                raise ConfigError(f"model.roles[{pattern!r}] = {role!r} is not a role; choose one of {list(ROLES)}")
            try:
                compiled.append((re.compile(pattern), Role(role)))
            except re.error as e:
                raise ConfigError(f"model.roles: {pattern!r} is not a regular expression ({e})") from None
        self.patterns: tuple[tuple[re.Pattern, Role], ...] = tuple(compiled)

    def as_dict(self) -> dict[str, str]:
        return {p.pattern: r.value for p, r in self.patterns}

    def matches(self, name: str) -> list[tuple[str, Role]]:
        clean = clean_name(name)
        return [(p.pattern, r) for p, r in self.patterns if p.search(clean)]

    def role_of(self, name: str) -> Role:
        found = self.matches(name)
        if len(found) == 1:
            return found[0][1]
        if not found:
            raise KeyError(f"parameter {name!r} matches no muP role; patterns: {[p.pattern for p, _ in self.patterns]}")
        raise KeyError(f"parameter {name!r} matches more than one role pattern: {found}")

    def check(self, names, where: str = "model.roles") -> dict[str, Role]:
        """Every name's role; a ConfigError listing every unmatched and every twice-matched name."""
        found = {n: self.matches(n) for n in names}
        unmatched = [n for n, m in found.items() if not m]
        twice = {n: [p for p, _ in m] for n, m in found.items() if len(m) > 1}
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} parameter(s) match no pattern: {unmatched}")
        if twice:
            problems.append(f"{len(twice)} parameter(s) match more than one pattern: {twice}")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems) + f" (patterns: {list(self.as_dict())}; "
                              f"roles: {list(ROLES)})")
        return {n: m[0][1] for n, m in found.items()}


def role_of(name: str, roles: RoleMap) -> Role:
    """The role of a parameter from its (FQN) name; an unknown name is an error, never a guess."""
    return roles.role_of(name)


@dataclass(frozen=True)
class Scale:
    """The shape variables the rules depend on."""

    m: float  # width multiplier d / d_base
    depth: int  # L
    depth_base: int  # L0
    depth_alpha: float  # a
    head_dim: int

    @property
    def depth_ratio(self) -> float:
        """L / L0."""
        return self.depth / self.depth_base


# --- the formulas, by name. Each returns the factor that multiplies the base value. ---------
FORMULAS = {
    "1": lambda s: 1.0,
    "0": lambda s: 0.0,
    "1/sqrt(m)": lambda s: s.m**-0.5,
    "1/m": lambda s: 1.0 / s.m,
    "m": lambda s: s.m,
    "sqrt(m)": lambda s: s.m**0.5,
    "1/sqrt(2L)": lambda s: (2.0 * s.depth) ** -0.5,
    "(L/L0)^(a-1)": lambda s: s.depth_ratio ** (s.depth_alpha - 1.0),
    "(L0/L)^a": lambda s: s.depth_ratio**-s.depth_alpha,
    "(L/L0)^(1-a)": lambda s: s.depth_ratio ** (1.0 - s.depth_alpha),
    "1/m*(L/L0)^(a-1)": lambda s: s.depth_ratio ** (s.depth_alpha - 1.0) / s.m,
    "1/sqrt(m)*(L/L0)^(a-1)": lambda s: s.depth_ratio ** (s.depth_alpha - 1.0) * s.m**-0.5,
    "m*(L/L0)^(1-a)": lambda s: s.m * s.depth_ratio ** (1.0 - s.depth_alpha),
    "sqrt(m)*(L/L0)^(1-a)": lambda s: s.m**0.5 * s.depth_ratio ** (1.0 - s.depth_alpha),
    "1/m*(L0/L)^a": lambda s: s.depth_ratio**-s.depth_alpha / s.m,
}


@dataclass(frozen=True)
class Rule:
    """How one role is treated: each field names a formula from FORMULAS.

    init: factor on sigma (``ones``/``zeros``: a gain or bias starts at 1/0; ``keep``: the model's own
    init is left alone); lr: factor on eta;
    wd: factor on lambda; eps: factor on Adam's eps. ``muon_adjust`` is torch Muon's
    adjust_lr_fn for the roles that go to Muon.
    """

    init: str
    lr: str
    wd: str
    eps: str = "1"
    muon_adjust: str | None = None


def _rules(**by_role: Rule) -> dict[Role, Rule]:
    return {Role(k): v for k, v in by_role.items()}


def _other_roles(rows: dict[Role, Rule]) -> dict[Role, Rule]:
    """The roles real models add, each written in terms of the seven above: a hidden matrix of no
    named kind takes the input-side rules (under mup all four hidden kinds share them); a readout and position
    embeddings are vector-like like the embedding (mup: fan-out finite); a bias moves like a norm
    gain (its gradient is the sum of the same output gradients), starts at zero and is not decayed;
    ``keep`` takes the base values unscaled and keeps the model's own init."""
    return {**rows, Role.HIDDEN: rows[Role.ATTN_QKV],
            Role.READOUT: rows[Role.EMBEDDING], Role.POS_EMBEDDING: rows[Role.EMBEDDING],
            Role.BIAS: Rule(init="zeros", lr=rows[Role.NORM_GAIN].lr, wd="0", eps=rows[Role.NORM_GAIN].eps),
            Role.KEEP: Rule(init="keep", lr="1", wd="1", eps="1")}


# (parametrization, optimizer) -> role -> Rule. Muon takes only the hidden matrices; the
# embedding and norm gains stay on AdamW, so their "muon" rows are their AdamW rows.
_XMODEL_ADAMW = _other_roles(_rules(
    embedding=Rule(init="1", lr="1", wd="1"),
    attn_qkv=Rule(init="1/sqrt(m)", lr="1/m", wd="1"),
    ffn_in=Rule(init="1/sqrt(m)", lr="1/m", wd="1"),
    attn_out=Rule(init="1/sqrt(2L)", lr="1/m", wd="1"),
    ffn_out=Rule(init="1/sqrt(2L)", lr="1/m", wd="1"),
    norm_gain=Rule(init="ones", lr="1/m", wd="0"),
    final_norm=Rule(init="ones", lr="1/m", wd="0"),  # the recipe treats every norm gain alike
))
# Everything inside a residual branch (hidden matrices, block norm gains) has gradients ~ 1/m *
# (L0/L)^a and moves the residual stream through the branch multiplier (L0/L)^a, so it takes the
# depth factors; the embedding and the final norm sit outside the branches: width factors only.
_MUP_ADAMW = _other_roles(_rules(
    embedding=Rule(init="1", lr="1", wd="1", eps="1/m"),
    attn_qkv=Rule(init="1/sqrt(m)", lr="1/m*(L/L0)^(a-1)", wd="m*(L/L0)^(1-a)", eps="1/m*(L0/L)^a"),
    ffn_in=Rule(init="1/sqrt(m)", lr="1/m*(L/L0)^(a-1)", wd="m*(L/L0)^(1-a)", eps="1/m*(L0/L)^a"),
    attn_out=Rule(init="1/sqrt(m)", lr="1/m*(L/L0)^(a-1)", wd="m*(L/L0)^(1-a)", eps="1/m*(L0/L)^a"),
    ffn_out=Rule(init="1/sqrt(m)", lr="1/m*(L/L0)^(a-1)", wd="m*(L/L0)^(1-a)", eps="1/m*(L0/L)^a"),
    norm_gain=Rule(init="ones", lr="(L/L0)^(a-1)", wd="0", eps="1/m*(L0/L)^a"),
    final_norm=Rule(init="ones", lr="1", wd="0", eps="1/m"),
))
_SP_ADAMW = _other_roles(_rules(
    embedding=Rule(init="1", lr="1", wd="1"),
    attn_qkv=Rule(init="1/sqrt(m)", lr="1", wd="1"),
    ffn_in=Rule(init="1/sqrt(m)", lr="1", wd="1"),
    attn_out=Rule(init="1/sqrt(m)", lr="1", wd="1"),
    ffn_out=Rule(init="1/sqrt(m)", lr="1", wd="1"),
    norm_gain=Rule(init="ones", lr="1", wd="0"),
    final_norm=Rule(init="ones", lr="1", wd="0"),
))


def _muon_rows(adamw: dict[Role, Rule], lr: str, wd: str) -> dict[Role, Rule]:
    rows = dict(adamw)
    for role in HIDDEN_MATRIX_ROLES:
        rows[role] = Rule(init=adamw[role].init, lr=lr, wd=wd, eps="1", muon_adjust="match_rms_adamw")
    return rows


TABLE: dict[tuple[str, str], dict[Role, Rule]] = {
    ("xmodel", "adamw"): _XMODEL_ADAMW,
    # The recipe: RMS matching on top of AdamW's eta/m (right at its single width m = 6).
    ("xmodel", "muon"): _muon_rows(_XMODEL_ADAMW, lr="1/m", wd="1"),
    ("mup", "adamw"): _MUP_ADAMW,
    # RMS matching with eta/sqrt(m): update spectral norm, hence ||dW x||, independent of width.
    ("mup", "muon"): _muon_rows(_MUP_ADAMW, lr="1/sqrt(m)*(L/L0)^(a-1)", wd="sqrt(m)*(L/L0)^(1-a)"),
    ("sp", "adamw"): _SP_ADAMW,
    ("sp", "muon"): _muon_rows(_SP_ADAMW, lr="1", wd="1"),
}


@dataclass(frozen=True)
class ForwardMultipliers:
    """Plain numbers the model multiplies by; the model knows nothing else about muP."""

    embedding: float  # x0 = embedding * E[token]
    residual_attn: float  # h += residual_attn * attention(norm(h))
    residual_ffn: float  # h += residual_ffn * ffn(norm(h))
    logits: float  # logits = logits * h E^T
    attn_scale: float  # softmax(attn_scale * q k^T)


# Forward multipliers: parametrization -> multiplier -> formula name (a key of FORWARD_FORMULAS).
FORWARD_RULES = {
    "xmodel": {"embedding": "alpha_in", "residual": "alpha_res/sqrt(L)", "logits": "alpha_out/m",
               "attn_scale": "1/d_head"},
    "mup": {"embedding": "alpha_in", "residual": "alpha_res/sqrt(L0)*(L0/L)^a", "logits": "alpha_out/m",
            "attn_scale": "1/d_head"},
    "sp": {"embedding": "alpha_in", "residual": "alpha_res/sqrt(L0)", "logits": "alpha_out",
           "attn_scale": "1/sqrt(d_head)"},
}
# The residual formulas take the branch's alpha (alpha_res, or alpha_res_attn / alpha_res_ffn when set).
FORWARD_FORMULAS = {
    "alpha_in": lambda s, hp: hp.alpha_in,
    "alpha_res/sqrt(L)": lambda s, alpha: alpha / math.sqrt(s.depth),
    "alpha_res/sqrt(L0)*(L0/L)^a": lambda s, alpha: alpha / math.sqrt(s.depth_base)
    * s.depth_ratio**-s.depth_alpha,
    "alpha_res/sqrt(L0)": lambda s, alpha: alpha / math.sqrt(s.depth_base),
    "alpha_out/m": lambda s, hp: hp.alpha_out / s.m,
    "alpha_out": lambda s, hp: hp.alpha_out,
    "1/d_head": lambda s, hp: 1.0 / s.head_dim,
    "1/sqrt(d_head)": lambda s, hp: 1.0 / math.sqrt(s.head_dim),
}


def scale_of(model: ModelConfig, param: ParamConfig) -> Scale:
    return Scale(
        m=model.d_model / param.d_base,
        depth=model.n_layers,
        depth_base=param.depth_base,
        depth_alpha=param.depth_alpha,
        head_dim=model.head_dim,
    )


def forward_multipliers(model: ModelConfig, param: ParamConfig, hp: HParams) -> ForwardMultipliers:
    s = scale_of(model, param)
    rules = FORWARD_RULES[param.parametrization]
    residual = FORWARD_FORMULAS[rules["residual"]]
    return ForwardMultipliers(
        embedding=FORWARD_FORMULAS[rules["embedding"]](s, hp),
        residual_attn=residual(s, hp.residual_attn),
        residual_ffn=residual(s, hp.residual_ffn),
        logits=FORWARD_FORMULAS[rules["logits"]](s, hp),
        attn_scale=FORWARD_FORMULAS[rules["attn_scale"]](s, hp),
    )


@dataclass(frozen=True)
class ParamSetting:
    """One parameter's resolved settings at this width and depth."""

    name: str
    role: Role
    optimizer: str  # which optimizer owns it: "adamw" or "muon"
    init_std: float | None  # the normal init's std; None: ``init`` says what else (ones, zeros, keep)
    lr: float
    weight_decay: float
    eps: float
    muon_adjust: str | None
    init: str = "normal"  # normal | ones | zeros | keep (the model's own init is left alone)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["role"] = self.role.value
        return d


def check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} = {value!r} is not allowed; choose one of {list(allowed)}")


def resolve(name: str, model: ModelConfig, param: ParamConfig, hp: HParams, optimizer: str, *,
            roles: RoleMap) -> ParamSetting:
    """Settings of parameter ``name`` when the run uses ``optimizer`` for its hidden matrices.

    ``model`` is the shape: anything with ``d_model`` (width), ``n_layers`` (depth) and ``head_dim``;
    ``roles`` the model spec's role map.
    """
    return resolve_role(roles.role_of(name), model, param, hp, optimizer, name=name)


def resolve_role(role: Role | str, model: ModelConfig, param: ParamConfig, hp: HParams, optimizer: str,
                 name: str = "") -> ParamSetting:
    """Settings of any parameter of ``role`` at this shape (the table needs no name)."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    role = Role(role)
    rule = TABLE[(param.parametrization, optimizer)][role]
    s = scale_of(model, param)
    f = lambda key: FORMULAS[key](s)  # noqa: E731
    owner = "muon" if (optimizer == "muon" and role in HIDDEN_MATRIX_ROLES) else "adamw"
    special = rule.init in ("ones", "zeros", "keep")
    return ParamSetting(
        name=name or role.value,
        role=role,
        optimizer=owner,
        init_std=None if special else hp.init_std * f(rule.init),
        lr=hp.lr * f(rule.lr),
        weight_decay=hp.weight_decay * f(rule.wd),
        eps=hp.adam_eps * f(rule.eps) if owner == "adamw" else hp.muon_eps,
        muon_adjust=rule.muon_adjust if owner == "muon" else None,
        init=rule.init if special else "normal",
    )


def resolve_all(named_params, model: ModelConfig, param: ParamConfig, hp: HParams, optimizer: str, *,
                roles: RoleMap):
    """ParamSetting for every (name, tensor) pair, in order."""
    return [resolve(n, model, param, hp, optimizer, roles=roles) for n, _ in named_params]


@torch.no_grad()
def init_weights(module: torch.nn.Module, model: ModelConfig, param: ParamConfig, hp: HParams,
                 generator: torch.Generator | None = None, *, roles: RoleMap) -> None:
    """Initialise every parameter from the table (init does not depend on the optimizer).

    An FSDP2 shard (DTensor) gets its rows of the full tensor a one-process init draws: the full
    tensor is drawn (one parameter at a time, never the whole model) and the rank keeps its shard.
    Meta tensors and ``keep`` parameters are skipped.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in module.named_parameters():
        if p.device.type == "meta":
            continue
        setting = resolve(name, model, param, hp, "adamw", roles=roles)
        local = p.to_local() if isinstance(p, DTensor) else p
        if setting.init in ("ones", "zeros"):
            local.fill_(1.0 if setting.init == "ones" else 0.0)
        elif setting.init == "keep":
            continue
        elif isinstance(p, DTensor):
            full = torch.empty(p.shape, device=local.device, dtype=p.dtype)
            full.normal_(0.0, setting.init_std, generator=generator)
            local.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.normal_(0.0, setting.init_std, generator=generator)


def param_groups(module: torch.nn.Module, model: ModelConfig, param: ParamConfig, hp: HParams,
                 optimizer: str, fuse: bool = False, *, roles: RoleMap,
                 fuse_key: Callable[[str], str] | None = None) -> dict[str, list[dict]]:
    """Optimizer parameter groups, keyed by the optimizer that owns them ("adamw", "muon").

    One group per (role, settings). Each group carries ``role``, ``names`` and ``base_lr`` (its peak
    LR, which schedules scale) alongside the usual keys; with ``fuse``, Muon groups carry
    ``fuse_keys`` (one per parameter, from the model spec's ``fuse_key``): the parameters that share
    a key are orthogonalised as one matrix (the recipe's fused Q|K|V and gate|up).
    """
    if fuse and optimizer == "muon" and fuse_key is None:
        raise ConfigError("fused Muon (optimizer.muon_fuse) needs a model spec that names its fused sets "
                          "(ModelSpec.fuse_key); this model's spec names none")
    role_by_name = roles.check([n for n, p in module.named_parameters()])
    groups: dict[tuple, dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        s = resolve_role(role_by_name[name], model, param, hp, optimizer, name=name)
        key = (s.optimizer, s.role, s.lr, s.weight_decay, s.eps, s.muon_adjust)
        if key not in groups:
            g = {"params": [], "names": [], "role": s.role.value, "lr": s.lr, "base_lr": s.lr,
                 "weight_decay": s.weight_decay}
            if s.optimizer == "adamw":
                g["eps"] = s.eps
            else:
                g["adjust_lr_fn"] = s.muon_adjust
                g["fuse"] = fuse
                if fuse:
                    g["fuse_keys"] = []
            groups[key] = g
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
        if "fuse_keys" in groups[key]:
            groups[key]["fuse_keys"].append(fuse_key(clean_name(name)))
    out: dict[str, list[dict]] = {"adamw": [], "muon": []}
    for key, g in groups.items():
        out[key[0]].append(g)
    return out


def describe_table() -> str:
    """The whole table as Markdown, for the docs and ``mutransfer plan --table``."""
    lines = ["| parametrization | optimizer | role | init (x sigma) | LR (x eta) | weight decay (x lambda) "
             "| Adam eps (x eps) | Muon adjust |", "|---|---|---|---|---|---|---|---|"]
    for (p, o), rows in TABLE.items():
        for role, r in rows.items():
            if o == "muon" and role not in HIDDEN_MATRIX_ROLES:
                continue
            lines.append(f"| {p} | {o} | {role.value} | {r.init} | {r.lr} | {r.wd} | "
                         f"{r.eps if not r.muon_adjust else '-'} | {r.muon_adjust or '-'} |")
    lines += ["", "| parametrization | embedding | residual branch | logits | attention softmax scale |",
              "|---|---|---|---|---|"]
    for p, f in FORWARD_RULES.items():
        lines.append(f"| {p} | {f['embedding']} | {f['residual']} | {f['logits']} | {f['attn_scale']} |")
    return "\n".join(lines)
