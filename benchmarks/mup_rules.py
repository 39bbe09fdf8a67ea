"""The measurements behind the ``mup`` table's width and depth rules (a benchmark, not a test).

    python benchmarks/mup_rules.py                          # everything: a table, and JSON
    python benchmarks/mup_rules.py --seeds 3 --out mup_rules.json

Everything runs on the ``tiny`` preset under ``mup`` (d_base 64, L0 4), at init or in a few AdamW
steps, on real data (the built-in corpus, byte tokens), one CPU thread; about a minute.
``tests/test_mup_rules.py`` asserts on the same functions, so the figures in docs/mup_table.md and
the tests come from one piece of code.

1. Adam eps (``gradients``). One forward/backward per shape; per role the RMS of the gradient over
   all its tensors; the slope of log2 RMS(grad) against log2 width (64..512, L = L0) and against
   log2 depth (4..32, d = 64, a = 1/2 and 1); and the same slope for eps / RMS(grad), with each
   AdamW group's eps as the table gives it. Adam's eps must follow the gradient, so eps/grad must
   be flat (slope about 0) for every AdamW group; a constant eps would have slope -(grad slope).
2. The norm gains' depth rule (``step_effect``). The loss decrease of one AdamW step that moves only
   one role -- the block norm gains, the final norm gain, or the hidden matrices as the control
   whose rule is known -- at depths 4..32, under the table's LR and under the alternative (block
   gains at the base LR, the rule before; the final gain with the block factor (L/L0)^(a-1)).
   A step's first-order effect is the sum of lr * |g| over the moved entries (Adam's first step is
   about lr * sign(g)); it is depth-flat when lr * (gradient's depth factor) * (number of blocks) is.
3. The weight-decay timescale (``decay_timescale``). AdamW's weights are an EMA of updates with
   timescale tau = 1/(lr * wd) steps (Wang & Aitchison, arXiv 2405.13698): the init component of
   every hidden matrix shrinks by (1 - lr * wd) per step. Measured per block at depths 4 and 16,
   a = 1/2 and 1, as the fraction of W0 left after some steps (tau = -steps / ln(<W, W0>/<W0, W0>)),
   with zero gradients (pure decay) and in real training, under the table's rule
   (wd x m (L/L0)^(1-a)) and CompleteP's reference rule (wd x m).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch

from mutransfer.build import build_model
from mutransfer.config import HParams, RunShape, updated
from mutransfer.data.builtin import builtin_dataset
from mutransfer.parametrization import HIDDEN_MATRIX_ROLES, Role, param_groups, role_of, scale_of
from mutransfer.presets import at_depth, at_width, get_preset
from mutransfer.transformer_spec import ROLE_MAP

WIDTHS = (64, 128, 256, 512)
DEPTHS = (4, 8, 16, 32)
ALPHAS = (0.5, 1.0)
BLOCK_ROLES = (*(r.value for r in HIDDEN_MATRIX_ROLES), Role.NORM_GAIN.value)  # inside a residual branch
OUTSIDE_ROLES = (Role.EMBEDDING.value, Role.FINAL_NORM.value)
HIDDEN = tuple(r.value for r in HIDDEN_MATRIX_ROLES)
HP = HParams()  # the recipe's base values (lr 0.01, sigma 0.1, wd 0.1, eps 1e-8, ...)
BATCH = (8, 128)  # rows x tokens of the gradient measurements


@cache
def _dataset():
    return builtin_dataset("byte")


def data_batch(batch_size: int = BATCH[0], seq_len: int = BATCH[1], step: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of real text (Tiny Shakespeare, byte tokens): (inputs, targets)."""
    return _dataset().batch("train", seed=0, step=step, batch_size=batch_size, seq_len=seq_len)


def tiny_shape(width: int = 64, depth: int = 4, alpha: float = 0.5) -> RunShape:
    """The ``tiny`` preset (mup, d_base 64, L0 4) at this width, depth and depth exponent."""
    base = get_preset("tiny")
    model = at_depth(at_width(base.model, width), depth)
    return RunShape(model=model, param=updated(base.param, "param", depth_alpha=alpha))


def log2_slope(xs, ys) -> float:
    """Least-squares slope of log2(y) against log2(x)."""
    return float(np.polyfit(np.log2(np.asarray(xs, float)), np.log2(np.asarray(ys, float)), 1)[0])


def grad_rms_by_role(shape: RunShape, hp: HParams, batch, seed: int = 0) -> dict[str, float]:
    """RMS of the loss gradient over all tensors of each role, after one forward/backward at init."""
    model = build_model(shape, hp, seed=seed)
    x, y = batch
    model(x, y).backward()
    sums: dict[str, list[float]] = {}
    for name, p in model.named_parameters():
        acc = sums.setdefault(role_of(name, ROLE_MAP).value, [0.0, 0])
        acc[0] += p.grad.double().square().sum().item()
        acc[1] += p.numel()
    return {role: math.sqrt(s / n) for role, (s, n) in sums.items()}


def adamw_eps_by_role(shape: RunShape, hp: HParams, optimizer: str = "adamw") -> dict[str, float]:
    """Each AdamW group's eps as the table gives it (one value per role), read from ``param_groups``."""
    model = build_model(shape, hp, device="meta")
    eps: dict[str, set[float]] = {}
    for g in param_groups(model, shape.model, shape.param, hp, optimizer, roles=ROLE_MAP)["adamw"]:
        eps.setdefault(g["role"], set()).add(g["eps"])
    assert all(len(v) == 1 for v in eps.values()), eps
    return {role: v.pop() for role, v in eps.items()}


def grad_scan(shapes: dict[int, RunShape], hp: HParams = HP, seeds=(0,), batch=None) -> dict:
    """Gradient RMS per role along one axis (``shapes``: x -> shape), geometric mean over seeds, and
    the log2 slope per role."""
    batch = batch if batch is not None else data_batch()
    xs = sorted(shapes)
    rms: dict[str, list[float]] = {}
    for x in xs:
        per_seed = [grad_rms_by_role(shapes[x], hp, batch, seed) for seed in seeds]
        for role in per_seed[0]:
            rms.setdefault(role, []).append(float(np.exp(np.mean([np.log(s[role]) for s in per_seed]))))
    return {"x": xs, "grad_rms": rms, "grad_slope": {role: log2_slope(xs, v) for role, v in rms.items()}}


def eps_scan(scan: dict, shapes: dict[int, RunShape], hp: HParams = HP, optimizer: str = "adamw") -> dict:
    """The table's eps for every role AdamW owns under ``optimizer``, along ``scan``'s axis, and the
    log2 slope of eps / RMS(grad); ``const_eps_slope`` is what a width- and depth-free eps would give."""
    eps: dict[str, list[float]] = {}
    for x in scan["x"]:
        for role, e in adamw_eps_by_role(shapes[x], hp, optimizer).items():
            eps.setdefault(role, []).append(e)
    ratio = {role: [e / g for e, g in zip(eps[role], scan["grad_rms"][role], strict=True)] for role in eps}
    return {"optimizer": optimizer, "eps": eps,
            "eps_over_grad_slope": {role: log2_slope(scan["x"], v) for role, v in ratio.items()},
            "const_eps_slope": {role: -scan["grad_slope"][role] for role in eps}}


def width_shapes(widths=WIDTHS) -> dict[int, RunShape]:
    return {w: tiny_shape(width=w) for w in widths}


def depth_shapes(alpha: float, depths=DEPTHS) -> dict[int, RunShape]:
    return {d: tiny_shape(depth=d, alpha=alpha) for d in depths}


def gradients(shapes: dict[int, RunShape], hp: HParams = HP, seeds=(0,)) -> dict:
    """``grad_scan`` and, for each optimizer, ``eps_scan`` of its AdamW groups."""
    scan = grad_scan(shapes, hp, seeds)
    return {**scan, "eps": {opt: eps_scan(scan, shapes, hp, opt) for opt in ("adamw", "muon")}}


def depth_factor(shape: RunShape) -> float:
    """(L/L0)^(a-1): the table's LR depth factor inside the residual branches."""
    s = scale_of(shape.model, shape.param)
    return s.depth_ratio ** (s.depth_alpha - 1.0)


# role moved -> candidate rule -> LR factor on top of the table's LR for that role
STEP_CANDIDATES = {
    Role.NORM_GAIN.value: {"table: (L/L0)^(a-1)": lambda s: 1.0, "base LR (before)": lambda s: 1 / depth_factor(s)},
    Role.FINAL_NORM.value: {"table: base LR": lambda s: 1.0, "block factor (L/L0)^(a-1)": depth_factor},
    "hidden": {"table: 1/m (L/L0)^(a-1)": lambda s: 1.0, "1/m, no depth factor": lambda s: 1 / depth_factor(s)},
}


HP_STEP = HP.model_copy(update={"lr": 1e-3})  # small enough that the loss drop is linear in the step


def step_effect(shape: RunShape, roles, lr_factors=(1.0,), hp: HParams = HP_STEP, seed: int = 0,
                batch=None) -> list[float]:
    """Loss decrease (on the same batch) from one real AdamW step that moves only ``roles``, for
    each LR factor in ``lr_factors`` (each from the same start).

    The groups are the table's (``param_groups``), each LR times the factor, weight decay off so the
    step is the LR's alone; every other parameter stays where it is.
    """
    batch = batch if batch is not None else data_batch()
    model = build_model(shape, hp, seed=seed)
    x, y = batch
    loss0 = model(x, y)
    loss0.backward()
    groups = [g for g in param_groups(model, shape.model, shape.param, hp, "adamw", roles=ROLE_MAP)["adamw"]
              if g["role"] in roles]
    assert groups, roles
    start = [[p.detach().clone() for p in g["params"]] for g in groups]
    drops = []
    for factor in lr_factors:
        for g, saved in zip(groups, start, strict=True):
            g["lr"] = g["base_lr"] * factor
            g["weight_decay"] = 0.0
            with torch.no_grad():
                for p, p0 in zip(g["params"], saved, strict=True):
                    p.copy_(p0)
        torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2)).step()
        with torch.no_grad():
            drops.append(float(loss0.detach().double() - model(x, y).double()))
    return drops


def step_effects(alpha: float, depths=DEPTHS, seeds=(0,), hp: HParams = HP_STEP, moved=tuple(STEP_CANDIDATES)
                 ) -> dict:
    """For each moved role and candidate rule: the loss decrease by depth (mean over seeds), log2 slope."""
    batch = data_batch()
    out: dict = {"x": list(depths), "lr": hp.lr}
    for what in moved:
        roles = HIDDEN if what == "hidden" else (what,)
        rules = list(STEP_CANDIDATES[what])
        drops = {rule: [] for rule in rules}
        for d in depths:
            shape = tiny_shape(depth=d, alpha=alpha)
            factors = [STEP_CANDIDATES[what][rule](shape) for rule in rules]
            per_seed = np.array([step_effect(shape, roles, factors, hp, seed, batch) for seed in seeds])
            for rule, v in zip(rules, per_seed.mean(axis=0), strict=True):
                drops[rule].append(float(v))
        out[what] = {rule: {"loss_drop": v, "slope": log2_slope(depths, v)} for rule, v in drops.items()}
    return out


WD_RULES = {
    "table: m (L/L0)^(1-a)": lambda s: 1.0,
    "CompleteP ref: m": depth_factor,  # lambda * m: the table's wd times (L/L0)^(a-1)
}


def _block_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def decay_timescale(shape: RunShape, wd_factor: float, steps: int, real_gradients: bool, hp: HParams = HP,
                    seed: int = 0, batch_size: int = 8, seq_len: int = 64) -> dict[int, float]:
    """tau per block (steps): -steps / ln(<W, W0> / <W0, W0>) over the block's hidden matrices.

    ``steps`` real torch AdamW steps with the table's groups (hidden matrices' weight decay times
    ``wd_factor``), constant LR, no clipping; with ``real_gradients`` on fresh batches of real text,
    else with zero gradients (pure decoupled decay).
    """
    model = build_model(shape, hp, seed=seed)
    groups = param_groups(model, shape.model, shape.param, hp, "adamw", roles=ROLE_MAP)["adamw"]
    for g in groups:
        if g["role"] in HIDDEN:
            g["weight_decay"] *= wd_factor
    opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2))
    hidden = {n: p for n, p in model.named_parameters() if role_of(n, ROLE_MAP).value in HIDDEN}
    w0 = {n: p.detach().double().clone() for n, p in hidden.items()}
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        if real_gradients:
            x, y = data_batch(batch_size, seq_len, step=step)
            model(x, y).backward()
        else:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        opt.step()
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for n, p in hidden.items():
        b = _block_of(n)
        num[b] = num.get(b, 0.0) + (p.detach().double() * w0[n]).sum().item()
        den[b] = den.get(b, 0.0) + w0[n].square().sum().item()
    return {b: -steps / math.log(num[b] / den[b]) for b in sorted(num)}


def decay_timescales(depths=(4, 16), alphas=ALPHAS, steps: int = 40, real_gradients: bool = False,
                     hp: HParams = HP) -> list[dict]:
    """tau per block for each (a, rule, depth), with 1/(lr*wd) predicted from the groups."""
    rows = []
    for alpha in alphas:
        for rule, factor in WD_RULES.items():
            for d in depths:
                shape = tiny_shape(depth=d, alpha=alpha)
                tau = decay_timescale(shape, factor(shape), steps, real_gradients, hp)
                lr_wd = {(g["lr"], g["weight_decay"] * factor(shape))
                         for g in param_groups(build_model(shape, hp, device="meta"), shape.model, shape.param,
                                               hp, "adamw", roles=ROLE_MAP)["adamw"] if g["role"] in HIDDEN}
                assert len(lr_wd) == 1, lr_wd
                lr, wd = lr_wd.pop()
                rows.append({"alpha": alpha, "rule": rule, "depth": d, "tau_by_block": tau,
                             "tau_mean": float(np.mean(list(tau.values()))), "tau_min": min(tau.values()),
                             "tau_max": max(tau.values()), "tau_predicted": -1.0 / math.log1p(-lr * wd),
                             "lr": lr, "weight_decay": wd})
    for row in rows:  # ratio to the same (a, rule) at the smallest depth
        ref = next(r for r in rows if r["alpha"] == row["alpha"] and r["rule"] == row["rule"]
                   and r["depth"] == min(depths))
        row["tau_ratio_to_L0"] = row["tau_mean"] / ref["tau_mean"]
    return rows


def _print_gradients(title: str, g: dict) -> None:
    print(f"   {title}")
    roles = list(g["grad_rms"])
    print("     " + f"{'slope of log2':<28}" + "".join(f"{r:>11}" for r in roles))
    print("     " + f"{'RMS(grad)':<28}" + "".join(f"{g['grad_slope'][r]:>+11.2f}" for r in roles))
    for opt, e in g["eps"].items():
        for key, label in (("eps_over_grad_slope", f"eps/RMS(grad), table ({opt})"),
                           ("const_eps_slope", f"eps/RMS(grad), const ({opt})")):
            print("     " + f"{label:<28}" + "".join(f"{e[key][r]:>+11.2f}" if r in e[key] else f"{'-':>11}"
                                                  for r in roles))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="initialisations averaged per shape (default 2)")
    ap.add_argument("--steps", type=int, default=40, help="AdamW steps of the weight-decay timescale (default 40)")
    ap.add_argument("--real-wd", type=float, default=1.0,
                    help="base weight decay in the real-gradient timescale runs (default 1.0: tau = 100 steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/benchmarks/mup_rules.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = tuple(range(args.seeds))
    t0 = time.perf_counter()
    result: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                "threads": args.threads}, "seeds": args.seeds,
                    "batch": {"rows": BATCH[0], "tokens": BATCH[1]}, "hparams": HP.model_dump()}

    print("1. log2 slopes of gradient RMS, and of eps/RMS(grad) for the AdamW groups (table's eps, or a constant)")
    result["width_gradients"] = gradients(width_shapes(), seeds=seeds)
    _print_gradients(f"against width {list(WIDTHS)} (L = L0 = 4)", result["width_gradients"])
    result["depth_gradients"] = {}
    for alpha in ALPHAS:
        result["depth_gradients"][str(alpha)] = gradients(depth_shapes(alpha), seeds=seeds)
        _print_gradients(f"against depth {list(DEPTHS)} (d = 64), a = {alpha}", result["depth_gradients"][str(alpha)])

    print("\n2. loss decrease of one AdamW step moving one role, by depth "
          f"{list(DEPTHS)} (d = 64, lr = {HP_STEP.lr}): log2 slope against depth")
    result["step_effects"] = {}
    for alpha in ALPHAS:
        eff = step_effects(alpha, seeds=seeds)
        result["step_effects"][str(alpha)] = eff
        for moved in STEP_CANDIDATES:
            for rule, v in eff[moved].items():
                drops = " ".join(f"{x:.4f}" for x in v["loss_drop"])
                print(f"   a = {alpha:<4} {moved:<11} {rule:<27} slope {v['slope']:+.2f}   [{drops}]")

    print(f"\n3. weight-decay timescale tau (steps) per block, {args.steps} AdamW steps; "
          "mean [min, max] over blocks, ratio to L = 4")
    hp_real = HP.model_copy(update={"weight_decay": args.real_wd})
    result["decay_timescale"] = {
        "zero_gradients": decay_timescales(steps=args.steps, real_gradients=False),
        "real_gradients": decay_timescales(steps=args.steps, real_gradients=True, hp=hp_real),
        "real_gradients_weight_decay": args.real_wd,
    }
    for kind in ("zero_gradients", "real_gradients"):
        for row in result["decay_timescale"][kind]:
            print(f"   {kind:<15} a = {row['alpha']:<4} {row['rule']:<22} L = {row['depth']:<3} "
                  f"tau {row['tau_mean']:8.1f} [{row['tau_min']:.1f}, {row['tau_max']:.1f}]  "
                  f"1/(lr wd) {row['tau_predicted']:8.1f}  ratio {row['tau_ratio_to_L0']:.3f}")
    result["wall_s"] = time.perf_counter() - t0
    print(f"\n{result['wall_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
