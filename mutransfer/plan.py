"""What a model costs and how each parameter group is set at its width, without building weights.

The model is built on the meta device (no memory, seconds even for 1.3B), so the numbers come
from the same code that trains it, and the per-group settings from the same muP table.
"""

from __future__ import annotations

from pathlib import Path

from mutransfer.build import build, build_model
from mutransfer.config import (
    ConfigError,
    HParams,
    ModelConfig,
    ParamConfig,
    RunShape,
    SpecModel,
    apply_overrides,
    load_toml,
    parse,
)
from mutransfer.parametrization import (
    HIDDEN_MATRIX_ROLES,
    OPTIMIZERS,
    Role,
    check_choice,
    resolve,
    resolve_role,
    scale_of,
)
from mutransfer.presets import at_depth, at_width, get_preset
from mutransfer.specs import spec_model, spec_of
from mutransfer.transformer_spec import transformer_spec

BYTES_FP32 = 4
SHAPE_KEYS = ("preset", "width", "depth")  # [model] keys besides ModelConfig's fields


def shape_from_config(data: dict, where: str, param_default: ParamConfig | None = None) -> RunShape:
    """A RunShape from a config's ``[model]`` table and ``[param]``.

    ``[model]``: ``preset`` plus ModelConfig field overrides, ``width`` (the preset's family at
    that width) and ``depth``. ``[param]`` overrides the preset's parametrization (or
    ``param_default``, e.g. a lock's, when given).
    """
    model_table = data.get("model", {})
    if not isinstance(model_table, dict):
        raise ConfigError(f"{where}.model: expected a table")
    model_table = dict(model_table)
    if "spec" in model_table:  # a user's model: its spec gives the base shape of the rules
        model = spec_model(model_table, where)
        spec = spec_of(model)
        return _with_param(data, RunShape(model=model, param=param_default or ParamConfig(
            d_base=spec.width, depth_base=spec.depth)), where)
    preset, width, depth = (model_table.pop(k, None) for k in SHAPE_KEYS)
    if preset is None:
        model = parse(ModelConfig, model_table, f"{where}.model")
        param = ParamConfig()
    else:
        if not isinstance(preset, str):
            raise ConfigError(f"{where}.model.preset: expected a preset name (got {preset!r})")
        base = get_preset(preset)
        model = parse(ModelConfig, {**base.model.model_dump(), **model_table}, f"{where}.model")
        param = base.param
    if width is not None:
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ConfigError(f"{where}.model.width: expected a positive integer (got {width!r})")
        model = at_width(model, width)
    if depth is not None:
        model = at_depth(model, depth)
    return _with_param(data, RunShape(model=model, param=param_default or param), where)


def _with_param(data: dict, shape: RunShape, where: str) -> RunShape:
    """``shape`` with the config's ``[param]`` overrides."""
    if "param" not in data:
        return shape
    if not isinstance(data["param"], dict):
        raise ConfigError(f"{where}.param: expected a table")
    param = parse(ParamConfig, {**shape.param.model_dump(), **data["param"]}, f"{where}.param")
    return RunShape(model=shape.model, param=param)


def resolve_target(target: str, overrides=()) -> tuple[RunShape, dict]:
    """A preset name or a TOML config path (with ``--set`` overrides); the shape and the raw config.

    A preset stands for the config ``[model] preset = NAME``, so ``--set model.width=128`` works on both.
    """
    if target.endswith(".toml") or Path(target).is_file():
        data = apply_overrides(load_toml(target), overrides)
        return shape_from_config(data, Path(target).name), data
    get_preset(target)
    data = apply_overrides({"model": {"preset": target}}, overrides)
    return shape_from_config(data, target), data if overrides else {}


def count_params(shape: RunShape) -> dict[str, int]:
    """Parameters of any model (its spec's build on the meta device): total, embedding, matmul."""
    spec = spec_of(shape.model)
    model = build(spec, shape.model.d_model, shape.model.n_layers, shape.param, HParams(), device="meta")
    total = sum(p.numel() for p in model.parameters())
    roles = spec.roles
    embedding = sum(p.numel() for n, p in model.named_parameters()
                    if roles.role_of(n) in (Role.EMBEDDING, Role.POS_EMBEDDING))
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)  # tied E counted once
    return {"params_total": total, "params_embedding": embedding, "params_non_embedding": total - embedding,
            "params_matmul": matmul}


def flops_per_token(shape: RunShape, seq_len: int) -> int:
    """6 N_matmul + 6 L H d_head T (RECIPE section 7): forward + backward, causal attention; H d_head is
    the query width, d (a spec model's query width is taken to be its width)."""
    m = shape.model
    return 6 * count_params(shape)["params_matmul"] + 6 * m.n_layers * m.d_model * seq_len


def builtin_only(shape: RunShape, what: str) -> None:
    """``what`` models the built-in Transformer (its memory, its stages): a spec model is an error naming the field."""
    if isinstance(shape.model, SpecModel):
        raise ConfigError(f"model.spec = {shape.model.spec!r}: {what} supports the built-in Transformer only "
                          "(model.preset or its fields): its memory model is written for it; sweeps, transfer checks, "
                          "coordinate checks and train take any spec")


def make_plan(shape: RunShape, hp: HParams, optimizer: str = "adamw", seq_len: int | None = None) -> dict:
    builtin_only(shape, "plan")
    check_choice("optimizer", optimizer, OPTIMIZERS)
    seq_len = seq_len or min(shape.model.max_seq_len, 4096)
    model = build_model(shape, hp, device="meta")
    counts = count_params(shape)
    rows: dict[tuple, dict] = {}
    hidden_params = 0
    roles = transformer_spec(shape.model).roles
    for name, p in model.named_parameters():
        s = resolve(name, shape.model, shape.param, hp, optimizer, roles=roles)
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
        "model": shape.model.model_dump(),
        "param": shape.param.model_dump(),
        "hparams": hp.model_dump(),
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
        "memory (fp32 weights + grads + {} states): {:.2f} GiB".format(plan["optimizer"],
                                                                     plan["memory_bytes"]["total"] / 2**30),
        "",
        f"{'role':<11} {'optim':<6} {'tensors':>7} {'params':>9} {'lr':>11} {'init_std':>11} "
        f"{'wd':>9} {'eps':>9}",
    ]
    for g in plan["param_groups"]:
        init = "ones" if g["init_std"] is None else f"{g['init_std']:.4e}"
        lines.append(f"{g['role']:<11} {g['optimizer']:<6} {g['tensors']:>7} {_human(g['params']):>9} "
                     f"{g['lr']:>11.4e} {init:>11} {g['weight_decay']:>9.4g} {g['eps']:>9.2e}")
    return "\n".join(lines)


# ---------------------------------------------------------------- memory, per stage and phase


def parse_bytes(text: str, where: str = "--gpu-memory") -> int:
    """``80GiB``, ``80GB``, ``141 GiB``, ``512MiB`` or a plain number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{where} = {text!r} is not a memory size; write e.g. 80GiB, 80GB or 85899345920")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(value * scale)
    if size <= 0:
        raise ConfigError(f"{where} = {text!r} must be positive")
    return size


# What a phase may use of the GPU: the memory model matches autograd's saved tensors exactly on CPU
# (tests/test_memory_model.py), but its GPU-side transients (attention kernels' workspaces, NCCL
# buffers at scale, the caching allocator's fragmentation when the sequence length changes between
# phases) are estimates, and a run that dies at its last stage loses days: plan for 85 %.
MEMORY_MARGIN = 0.15


def memory_plan(run, shape: RunShape, world_size: int, gpu_memory: int, margin: float = MEMORY_MARGIN) -> dict:
    """Peak memory of every stage's phases on one GPU of ``world_size`` (``mutransfer.memory``), for a
    checked staged config (``mutransfer.run_config.check_run``).

    A phase fits when its peak (training and evaluation) is at most ``(1 - margin)`` of the GPU.
    Each phase also gets the lightest activation checkpointing that fits (none, then selective where
    the precision allows it, then full), so a phase that recomputes more than it needs is named.
    """
    from mutransfer.memory import estimate
    from mutransfer.precision import check_checkpointing
    from mutransfer.stages import phase_where

    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"--world-size = {world_size!r} must be a positive integer")
    plan, train = run.stages, run.train
    plan.validate_parallel(world_size)  # names the stage whose global batch does not divide
    mode = run.parallel.mode if world_size > 1 else "none"
    eval_seq = train.eval_seq_len or plan.stages[0].phases[0].seq_len
    eval_rows = min(train.eval_micro_batch or train.eval_batch_size, train.eval_batch_size)
    limit = (1 - margin) * gpu_memory
    allowed = []
    for policy in ("none", "selective", "full"):  # lightest recomputation first
        try:
            check_checkpointing(train.precision, policy)
            allowed.append(policy)
        except ConfigError:
            pass

    def phase_estimate(stage, phase, policy):
        return estimate(shape.model, seq_len=phase.seq_len, micro_batch=phase.micro_batch, world_size=world_size,
                        parallel=mode, optimizer=stage.optimizer, precision=train.precision,
                        checkpointing=policy, loss_chunk_tokens=train.loss_chunk_tokens,
                        eval_tokens=eval_rows * eval_seq)

    entries = []
    for i, stage, j, phase in plan.phases():
        policy = stage.policy(phase, train.activation_checkpointing)
        est = phase_estimate(stage, phase, policy)
        peak = max(est.peak, est.eval_peak)
        lightest, lightest_peak = None, None
        for candidate in allowed:
            other = est if candidate == policy else phase_estimate(stage, phase, candidate)
            if max(other.peak, other.eval_peak) <= limit:
                lightest, lightest_peak = candidate, max(other.peak, other.eval_peak)
                break
        entries.append({"name": stage.name, "phase": j, "phases": len(stage.phases),
                        "where": phase_where(i, stage, j), "seq_len": phase.seq_len,
                        "micro_batch": phase.micro_batch, "optimizer": stage.optimizer, "checkpointing": policy,
                        "accumulation": phase.accumulation(world_size), "peak_bytes": peak,
                        "train_peak_bytes": est.peak, "eval_peak_bytes": est.eval_peak,
                        "fits": peak <= limit, "margin_bytes": int(gpu_memory - peak),
                        "lightest_fitting": lightest, "lightest_fitting_peak_bytes": lightest_peak,
                        "breakdown_bytes": {k: v for k, v in est.__dict__.items() if k not in ("peak", "eval_peak")}})
    return {"world_size": world_size, "gpu_memory_bytes": gpu_memory, "margin_fraction": margin,
            "parallel": mode, "precision": train.precision,
            "activation_checkpointing": train.activation_checkpointing,
            "loss_chunk_tokens": train.loss_chunk_tokens, "stages": entries,
            "fits": all(e["fits"] for e in entries)}


def format_memory(mem: dict) -> str:
    gib = 2**30
    lines = [f"memory per GPU: {mem['world_size']} GPU(s) of {mem['gpu_memory_bytes'] / gib:.1f} GiB, "
             f"{mem['parallel']}, {mem['precision']}, loss chunk {mem['loss_chunk_tokens']} tokens "
             f"(fits: peak <= {100 * (1 - mem['margin_fraction']):.0f} % of the GPU)",
             f"{'stage':<18} {'seq x micro':>13} {'optim':<6} {'recompute':<10} {'params':>7} {'grads':>6} "
             f"{'opt st':>6} {'activ.':>7} {'transient':>9} {'eval':>6} {'peak GiB':>9}  verdict"]
    for e in mem["stages"]:
        b = e["breakdown_bytes"]
        transient = max(b["loss_transient"], b["recompute_transient"] + b["backward_transient"])
        verdict = (f"fits ({e['margin_bytes'] / gib:.1f} GiB to spare)" if e["fits"] else
                   f"DOES NOT FIT ({-e['margin_bytes'] / gib:.1f} GiB over)" if e["margin_bytes"] < 0 else
                   f"DOES NOT FIT (only {e['margin_bytes'] / gib:.1f} GiB to spare, below the margin)")
        name = e["name"] + (f"[{e['phase']}]" if e["phases"] > 1 else "")
        lines.append(f"{name:<18} {e['seq_len']:>7} x {e['micro_batch']:<3} {e['optimizer']:<6} "
                     f"{e['checkpointing']:<10} {b['params'] / gib:>7.2f} {b['grads'] / gib:>6.2f} "
                     f"{b['optimizer_states'] / gib:>6.2f} {b['activations'] / gib:>7.2f} {transient / gib:>9.2f} "
                     f"{b['eval_transient'] / gib:>6.2f} {e['peak_bytes'] / gib:>9.2f}  {verdict}")
    failing = ", ".join(e["where"] for e in mem["stages"] if not e["fits"])
    lines.append("verdict: " + ("every stage fits" if mem["fits"] else f"NOT every stage fits: {failing}"))
    order = ("none", "selective", "full")
    for e in mem["stages"]:
        best, policy = e["lightest_fitting"], e["checkpointing"]
        name = e["name"] + (f"[{e['phase']}]" if e["phases"] > 1 else "")
        setting = f"{e['where']}.activation_checkpointing = {best!r}"
        if best is None or best == policy:
            continue
        if e["fits"] and order.index(best) < order.index(policy):
            lines.append(f"recomputation: {name} recomputes ({policy!r}) where {best!r} fits "
                         f"(peak {e['lightest_fitting_peak_bytes'] / gib:.2f} GiB): {setting}")
        elif not e["fits"]:
            lines.append(f"recomputation: {name} does not fit with {policy!r}; {best!r} fits "
                         f"(peak {e['lightest_fitting_peak_bytes'] / gib:.2f} GiB): {setting}")
    return "\n".join(lines)


# ---------------------------------------------------------------- from the proxy's LR to the target's

def transfer_table(lock, target: RunShape, factor: float, applied: bool,
                   interval: list[float] | None = None, weight_decay: float | None = None) -> list[dict]:
    """Per optimizer and role: the LR at the proxy's shape (where the lock was tuned), at the
    target's shape (the muP table's width/depth transfer), and after the fitted horizon/batch laws
    (``factor``; applied to the run only when its config asks for it), with ``lr_interval_90``: the
    corrected LR at the ends of ``interval`` (the factor's 90 % interval, ``laws.factor_interval``;
    None without one). Each group's weight decay is the lock's under the muP table, or, given
    ``weight_decay`` (the base value the Power Lines law set: ``mutransfer.wd_law``), that one's."""
    from mutransfer.config import RunShape as Shape
    from mutransfer.config import updated
    proxy = Shape(model=lock.proxy_model, param=lock.param)
    hp = lock.hparams
    roles = transformer_spec(target.model).roles
    present = {roles.role_of(n) for n, _ in build_model(target, hp, device="meta").named_parameters()}

    def lr_at(role, optimizer, f):
        return resolve_role(role, target.model, target.param, updated(hp, "transfer", lr=hp.lr * f), optimizer).lr

    rows = []
    for optimizer in ("adamw", "muon"):
        for role in (r for r in Role if r in present):
            at_proxy = resolve_role(role, proxy.model, proxy.param, hp, optimizer)
            if optimizer == "muon" and at_proxy.optimizer != "muon":
                continue
            at_target = resolve_role(role, target.model, target.param, hp, optimizer)
            wd = at_target.weight_decay if weight_decay is None else resolve_role(
                role, target.model, target.param, updated(hp, "transfer", weight_decay=weight_decay),
                optimizer).weight_decay
            rows.append({"optimizer": at_target.optimizer, "role": role.value, "proxy_lr": at_proxy.lr,
                         "target_lr": at_target.lr, "corrected_lr": lr_at(role, optimizer, factor), "applied": applied,
                         "lr_interval_90": [lr_at(role, optimizer, f) for f in interval] if interval else None,
                         "weight_decay": wd, "weight_decay_by_law": weight_decay is not None})
    return rows


def weight_decay_transfer(wd: dict | None = None) -> dict:
    """What plan says about lambda: the Power Lines law's value at the target's tokens per parameter
    (``wd``: ``mutransfer.wd_law.weight_decay_at_target``; applied or would-be), or, without a law in
    the lock, that no law transfers it."""
    if not wd or "law_weight_decay" not in wd:
        return {"transferred_by_law": False, "interval_90": None,
                "note": "weight decay is not transferred by a law: the lock has no weight-decay law (attach a "
                        "Power Lines check with `freeze --law`), so each group's lambda is the lock's base value "
                        "under the muP table, with no interval; AdamW's decay per step (LR x lambda) follows the "
                        "corrected LR"}
    ci = wd.get("interval_90")
    interval = f", 90 % interval [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""
    state = ("applied" if wd["applied"] else
             f"not applied: the run keeps the lock's {wd['lock_weight_decay']:.3g}; [transfer] weight_decay = "
             "'fitted' applies it")
    note = (f"the Power Lines law (tau_opt = c (D/N)^m) gives base lambda {wd['law_weight_decay']:.4g}{interval} at "
            f"{wd['tpp']:.3g} tokens/parameter, {wd['steps']} steps and base LR {wd['lr']:.4g} (tau {wd['tau']:.3g}; "
            f"fitted up to {wd['fitted_tpp_max']:.3g} tokens/parameter: target / largest fitted "
            f"x{wd['extrapolation']:.3g}); {state}")
    if wd["beyond_limit"]:
        note += "; warning: carried past the 8x the law is trusted to"
    if wd["outcome"] != "pass":
        note += f"; warning: its check's verdict was {wd['outcome']}, not pass"
    return {"transferred_by_law": wd["applied"], "weight_decay": wd["weight_decay"],
            "law_weight_decay": wd["law_weight_decay"], "tokens_per_parameter": wd["tpp"],
            "interval_90": ci, "note": note}


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_transfer_table(rows: list[dict], fix: dict, warnings: list[dict] = (), wd: dict | None = None) -> str:
    def term(kind: str, t: dict) -> str:
        if t.get("applied"):
            return (f"{kind} x{t['factor']:.3g} ({t['unit']} {t['proxy']:.3g} -> {t['target']:.3g}, "
                    f"beta {t['beta']:.3f})")
        return f"{kind} off" + (f" (would be x{t['would_be']:.3g})" if t.get("would_be") else "")

    terms = ", ".join(term(k, t) for k, t in fix["terms"].items()) or "no fitted law in the lock"
    level = int(round(100 * fix.get("interval", {}).get("level", 0.9)))
    lines = [f"LR per group: at the proxy (as tuned) -> at the target (muP transfer) -> corrected by the fitted "
             f"laws ({terms}), with its {level} % interval",
             f"{'group':<18} {'proxy LR':>11} {'target LR':>11} {'corrected':>12} {f'{level} % interval':>25}"]
    for r in rows:
        corrected_lr = f"{r['corrected_lr']:.4e}" + ("" if r["applied"] else "*")
        ci = r.get("lr_interval_90")
        ci = f"[{ci[0]:.4e}, {ci[1]:.4e}]" if ci else "-"
        lines.append(f"{r['optimizer'] + '/' + r['role']:<18} {r['proxy_lr']:>11.4e} {r['target_lr']:>11.4e} "
                     f"{corrected_lr:>12} {ci:>25}")
    if rows and not rows[0]["applied"]:
        lines.append("(* not applied: the config keeps the lock's values; [transfer] horizon/batch = 'fitted' "
                     "applies it)")
    interval = fix.get("interval") or {}
    if fix["terms"]:
        sources = "; ".join(f"{k}: {v}" for k, v in interval.get("sources", {}).items()) or "none"
        lines.append(f"interval: 5th-95th percentile of the corrected LR over the laws' draws ({sources})")
        for kind, t in fix["terms"].items():
            tpp = t.get("tokens_per_parameter") or {}
            fitted = tpp.get("fitted_range")
            tpp_text = "" if not tpp else (f"; tokens/parameter {tpp['target']:.3g} at the target, "
                                           + (f"{fitted[0]:.3g}-{fitted[1]:.3g} fitted" if fitted
                                              else "fitted range not recorded"))
            lines.append(f"extrapolation of the {kind} law: x{_number(t.get('extrapolation'))} past its largest "
                         f"fitted value ({_number(t.get('largest_fitted'))} -> {_number(t['target'])} {t['unit']}; "
                         f"trusted up to x{t['extrapolation_limit']:g}){tpp_text}")
    else:
        lines.append("interval: none (no fitted law: the LR is carried by muP alone, exactly as the lock holds it)")
    lines.append("weight decay: " + weight_decay_transfer(wd)["note"])
    lines += [f"warning: {w['message']}" for w in warnings]
    return "\n".join(lines)
