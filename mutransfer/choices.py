"""A staged run's choices beyond its base hyperparameters, each with where it came from.

The recipe (RECIPE sections 2 and 4) restarts every optimizer state at the AdamW -> Muon switch,
runs Muon on the fused Q|K|V and gate|up matrices, ends long context at an absolute LR that every
group reaches, and gives the attention and FFN residual branches their own multipliers. Its config
writes each of them, so a lock of another parametrization changes none; a config that leaves the
switch's out gets its parametrization's default. ``plan``, config.json and the trainer's events
show the values and their sources, so nothing differs unseen.
"""

from __future__ import annotations

from mutransfer.config import HParams, RunShape
from mutransfer.parametrization import FORWARD_RULES, forward_multipliers
from mutransfer.stages import StagePlan


def _given(model, field: str, where: str) -> str:
    return where if field in model.model_fields_set else f"the default ({where} unset)"


def recipe_choices(shape: RunShape, stages: StagePlan, residual, lock_hp: HParams, run_hp: HParams) -> dict:
    """The choices as plain data (JSON): each ``{"value", "from"}``; ``residual`` per branch."""
    param = shape.param.parametrization
    sw = stages.switch
    mult = forward_multipliers(shape.model, shape.param, run_hp)
    branches = {}
    for branch, key, alpha, lock_alpha, multiplier in (
            ("attn", "alpha_res_attn", run_hp.residual_attn, lock_hp.residual_attn, mult.residual_attn),
            ("ffn", "alpha_res_ffn", run_hp.residual_ffn, lock_hp.residual_ffn, mult.residual_ffn)):
        if getattr(residual, key) != "lock":
            source = f"residual.{key}"
        else:
            source = f"the lock ({key if getattr(lock_hp, key) is not None else 'alpha_res'})"
        branches[branch] = {"alpha": alpha, "from": source, "lock_alpha": lock_alpha,
                            "rule": FORWARD_RULES[param]["residual"], "multiplier": multiplier}
    return {
        "parametrization": param,
        "switch": {"value": stages.switch_step is not None, "stage": sw.switch_stage if sw.switch else None,
                   "step": stages.switch_step, "from": _given(sw, "switch", "optimizer.switch")},
        "restart": {"value": sw.restart_for(param), "from": sw.restart_source(param)},
        "muon_fuse": {"value": sw.fuse_for(param), "from": sw.fuse_source(param)},
        "carry_momentum": {"value": sw.carry_momentum, "from": _given(sw, "carry_momentum",
                                                                      "optimizer.carry_momentum")},
        "lr_floor": [{"stage": s.name, "end_lr": s.lr_end_abs, "from": f"stages[{i}] ({s.name}).lr.end_lr"}
                     for i, s in enumerate(stages.stages) if s.lr_end_abs is not None],
        "residual": branches,
    }


def format_choices(c: dict) -> str:
    """The block ``mutransfer plan`` prints: one line per choice, its source in brackets."""
    lines = [f"recipe choices (the lock's parametrization: {c['parametrization']}; where each comes from in [ ]):"]
    sw = c["switch"]
    if sw["value"]:
        lines.append(f"  optimizer switch: AdamW -> Muon from stage {sw['stage']!r} (step {sw['step']})  "
                     f"[{sw['from']}]")
        restart = c["restart"]
        what = ("every optimizer state starts afresh, the embedding's and norm gains' too"
                if restart["value"] == "all" else "the embedding's and norm gains' AdamW state is kept")
        lines.append(f"  at the switch: restart {restart['value']!r}: {what}  [{restart['from']}]")
        fuse = c["muon_fuse"]
        what = ("fused Q|K|V and gate|up, each orthogonalised as one matrix" if fuse["value"]
                else "per matrix (wq, wk, wv, w1, w3 each on its own)")
        lines.append(f"  Muon matrices: {what}  [{fuse['from']}]")
        carry = c["carry_momentum"]
        lines.append(f"  Muon momentum: {'seeded with AdamW first moment' if carry['value'] else 'fresh'}  "
                     f"[{carry['from']}]")
    else:
        lines.append(f"  optimizer switch: none, AdamW throughout  [{sw['from']}]")
    for floor in c["lr_floor"]:
        lines.append(f"  LR floor: {floor['stage']} ends at {floor['end_lr']:.4g}, every group  [{floor['from']}]")
    res = c["residual"]
    parts = []
    for branch, name in (("attn", "attention"), ("ffn", "FFN")):
        r = res[branch]
        lock = f"; the lock's {r['lock_alpha']}" if r["from"].startswith("residual.") else ""
        parts.append(f"{name} {r['alpha']} -> {r['multiplier']:.4g}  [{r['from']}{lock}]")
    lines.append(f"  residual multipliers ({res['attn']['rule']}): " + ", ".join(parts))
    return "\n".join(lines)
