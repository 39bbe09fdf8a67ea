"""What a model costs and how each parameter group is set at its width, without building weights.

The model is built on the meta device (no memory, seconds even for 1.3B), so the numbers come
from the same code that trains it, and the per-group settings from the same muP table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mutransfer.build import build_model
from mutransfer.config import HParams, ModelConfig, ParamConfig, RunShape, from_mapping, load_toml
from mutransfer.parametrization import HIDDEN_MATRIX_ROLES, OPTIMIZERS, Role, check_choice, resolve, scale_of
from mutransfer.presets import at_width, get_preset

BYTES_FP32 = 4


def shape_from_config(data: dict, where: str) -> RunShape:
    """A RunShape from a config's ``[model]`` table (``preset`` plus field overrides) and ``[param]``."""
    model_table = dict(data.get("model", {}))
    preset = model_table.pop("preset", None)
    width = model_table.pop("width", None)
    if preset is None:
        model = from_mapping(ModelConfig, model_table, f"{where}.model")
        param = ParamConfig()
    else:
        base = get_preset(preset)
        model = from_mapping(ModelConfig, {**dataclasses.asdict(base.model), **model_table}, f"{where}.model")
        param = base.param
    if width is not None:
        model = at_width(model, int(width))
    if "param" in data:
        param = from_mapping(ParamConfig, {**dataclasses.asdict(param), **data["param"]}, f"{where}.param")
    return RunShape(model=model.validate(f"{where}.model"), param=param.validate(f"{where}.param"))


def resolve_target(target: str) -> tuple[RunShape, dict]:
    """A preset name, or a TOML config path; returns the shape and the raw config (empty for presets)."""
    if target.endswith(".toml") or Path(target).is_file():
        data = load_toml(target)
        return shape_from_config(data, Path(target).name), data
    return get_preset(target), {}


def count_params(shape: RunShape) -> dict[str, int]:
    model = build_model(shape, HParams(), device="meta")
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)  # tied E counted once
    return {"params_total": total, "params_embedding": embedding, "params_non_embedding": total - embedding,
            "params_matmul": matmul}


def flops_per_token(shape: RunShape, seq_len: int) -> int:
    """6 N_matmul + 6 L H d_head T (RECIPE section 7): forward + backward, causal attention."""
    m = shape.model
    return 6 * count_params(shape)["params_matmul"] + 6 * m.n_layers * m.n_heads * m.head_dim * seq_len


def make_plan(shape: RunShape, hp: HParams, optimizer: str = "adamw", seq_len: int | None = None) -> dict:
    check_choice("optimizer", optimizer, OPTIMIZERS)
    seq_len = seq_len or min(shape.model.max_seq_len, 4096)
    model = build_model(shape, hp, device="meta")
    counts = count_params(shape)
    rows: dict[tuple, dict] = {}
    hidden_params = 0
    for name, p in model.named_parameters():
        s = resolve(name, shape.model, shape.param, hp, optimizer)
        if s.role in HIDDEN_MATRIX_ROLES:
            hidden_params += p.numel()
        key = (s.role, s.optimizer)
        row = rows.setdefault(key, {"role": s.role.value, "optimizer": s.optimizer, "lr": s.lr,
                                    "init_std": s.init_std, "weight_decay": s.weight_decay,
                                    "eps": s.eps, "muon_adjust": s.muon_adjust, "tensors": 0, "params": 0})
        row["tensors"] += 1
        row["params"] += p.numel()
    n = counts["params_total"]
    muon_states = hidden_params if optimizer == "muon" else 0
    adam_states = 2 * (n - hidden_params) + (2 * hidden_params if optimizer == "adamw" else 0)
    memory = {"weights_fp32": BYTES_FP32 * n, "grads_fp32": BYTES_FP32 * n,
              "optimizer_states_fp32": BYTES_FP32 * (adam_states + muon_states)}
    memory["total"] = sum(memory.values())
    order = [r.value for r in Role]
    groups = sorted(rows.values(), key=lambda r: (order.index(r["role"]), r["optimizer"]))
    return {
        "model": dataclasses.asdict(shape.model),
        "param": dataclasses.asdict(shape.param),
        "hparams": dataclasses.asdict(hp),
        "width_multiplier": scale_of(shape.model, shape.param).m,
        "optimizer": optimizer,
        "seq_len": seq_len,
        **counts,
        "flops_per_token": flops_per_token(shape, seq_len),
        "memory_bytes": memory,
        "param_groups": groups,
    }


def _human(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f}{unit}"
    return f"{x:.0f}"


def format_plan(plan: dict) -> str:
    m = plan["model"]
    lines = [
        f"model: d={m['d_model']} layers={m['n_layers']} heads={m['n_heads']}/{m['n_kv_heads']}kv "
        f"head_dim={m['head_dim']} ffn={m['ffn_dim']} vocab={m['vocab_size']} tokenizer={m['tokenizer']}",
        f"parametrization: {plan['param']['parametrization']}  m = d/d_base = {plan['width_multiplier']:.4g}  "
        f"depth {m['n_layers']} (base {plan['param']['depth_base']})",
        f"parameters: total {_human(plan['params_total'])}  non-embedding {_human(plan['params_non_embedding'])}"
        f"  embedding {_human(plan['params_embedding'])}",
        f"FLOPs/token (seq {plan['seq_len']}): {_human(plan['flops_per_token'])}",
        "memory (fp32 weights + grads + {} states): {}B".format(plan["optimizer"],
                                                               _human(plan["memory_bytes"]["total"])),
        "",
        f"{'role':<11} {'optim':<6} {'tensors':>7} {'params':>9} {'lr':>11} {'init_std':>11} "
        f"{'wd':>9} {'eps':>9}",
    ]
    for g in plan["param_groups"]:
        init = "ones" if g["init_std"] is None else f"{g['init_std']:.4e}"
        lines.append(f"{g['role']:<11} {g['optimizer']:<6} {g['tensors']:>7} {_human(g['params']):>9} "
                     f"{g['lr']:>11.4e} {init:>11} {g['weight_decay']:>9.4g} {g['eps']:>9.2e}")
    return "\n".join(lines)


def hparams_from(args_overrides: dict, base: HParams | None = None) -> HParams:
    """HParams with overrides; unknown names are an error naming the field."""
    base = base or HParams()
    merged = {**dataclasses.asdict(base), **{k: v for k, v in args_overrides.items() if v is not None}}
    return from_mapping(HParams, merged, "hparams").validate()
