"""The coordinate-check verdict, from a run directory's ``coord.parquet`` (the command exits on it).

The verdict is a number per module and step: the least-squares slope of log2(size) against
log2(axis value) -- the width, or the depth for a depth check. Under μP every slope is near 0;
under SP hidden outputs and logits grow (+0.4 to +3, RECIPE section 6), so a threshold of 0.1
separates the two.

A *module* here is one kind of module across the blocks (e.g. ``attn_out``: the attention output
of every block), and its slope is the mean of the per-block slopes (the slope of the geometric
mean over blocks of the seed-mean size). The μP table acts on a role in every block alike, and
at the tiny family's widths a single block's slope carries about ±0.1 of finite-width and seed
noise, which the mean over blocks halves; the per-block slopes are in verdict.json for diagnosis.
Along depth the blocks themselves change with the axis, so there the size of a kind is the
geometric mean over its blocks at each depth, and the slope is fitted to that.

Rule (docs/coord_check.md), with step s = the forward pass after s optimizer steps:
- step 0 (at initialisation, and the first update): no module may grow, slope <= threshold;
- step 1: |slope| <= threshold, except that the output and attention logits may shrink;
- every later step: |slope| <= threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mutransfer.coord import KINDS, LOGIT_KINDS
from mutransfer.rundir import write_json

DEFAULT_THRESHOLD = 0.1
DEFAULT_STATISTIC = "l1"
DESCRIPTIONS = {
    "embedding": "embedding output after the alpha_in multiplier",
    "attn_out": "attention output projection of every block",
    "ffn_out": "MLP output projection of every block",
    "residual": "residual stream (block output) of every block",
    "attn_logits": "attention logits attn_scale * q k^T (causal entries) of every block",
    "output_logits": "output logits",
    "dWx.attn_qkv": "update effect dW x of the query, key and value projections in every block",
    "dWx.attn_out": "update effect dW x of the attention output projection in every block",
    "dWx.ffn_in": "update effect dW x of the MLP input projections in every block",
    "dWx.ffn_out": "update effect dW x of the MLP output projection in every block",
    "dWx.hidden": "update effect dW x of the hidden matrices of no named kind (roles inferred from shapes)",
    "dWx.output": "update effect dW x of the readout (tied or not) on the output logits",
}


def load(out_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(out_dir) / "coord.parquet")


def fit_slope(widths: np.ndarray, sizes: np.ndarray) -> float:
    """Least-squares slope of log2(size) on log2(width); NaN when a size is not positive and finite."""
    if len(widths) < 2 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        return math.nan
    return float(np.polyfit(np.log2(widths), np.log2(sizes), 1)[0])


def axis_of(df: pd.DataFrame) -> str:
    """The column the check moved along: ``width`` (default) or ``depth``."""
    return str(df["axis"].iloc[0]) if "axis" in df.columns and len(df) else "width"


def _by_kind_over_blocks(d: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Depth axis: the geometric mean over a kind's blocks per (param, kind, step, axis value, seed)."""
    d = d[d["value"] > 0].assign(log2=lambda f: np.log2(f["value"]))
    g = d.groupby(["param", "kind", "step", axis, "seed"], as_index=False)["log2"].mean()
    return g.assign(value=np.exp2(g["log2"]), module=g["kind"]).drop(columns="log2")


def module_slopes(df: pd.DataFrame, statistic: str = DEFAULT_STATISTIC) -> pd.DataFrame:
    """One row per (param, module, kind, step): the slope of the seed-mean size against the axis."""
    axis = axis_of(df)
    d = df[(df["statistic"] == statistic) & df["kind"].isin(KINDS)]
    if axis == "depth":
        d = _by_kind_over_blocks(d, axis)
    sizes = d.groupby(["param", "module", "kind", "step", axis], as_index=False)["value"].mean()
    rows = []
    for (param, module, kind, step), g in sizes.groupby(["param", "module", "kind", "step"], sort=False):
        g = g.sort_values(axis)
        rows.append({"param": param, "module": module, "kind": kind, "step": int(step),
                     "slope": fit_slope(g[axis].to_numpy(float), g["value"].to_numpy(float))})
    return pd.DataFrame(rows)


def seed_intervals(df: pd.DataFrame, statistic: str = DEFAULT_STATISTIC, level: float = 0.9) -> dict:
    """(kind, step) -> the slope's interval over seeds (``optimum_stats.coord_slope``): each seed's size
    of a kind is its geometric mean over the kind's blocks, so the interval is that of the verdict's
    mean-over-blocks slope. None where there are fewer than 2 seeds."""
    from mutransfer.optimum_stats import coord_slope

    axis = axis_of(df)
    d = df[(df["statistic"] == statistic) & df["kind"].isin(KINDS) & (df["value"] > 0)]
    d = d.assign(log2=np.log2(d["value"]))
    per_seed = d.groupby(["kind", "step", axis, "seed"], as_index=False)["log2"].mean()
    out = {}
    for (kind, step), g in per_seed.groupby(["kind", "step"], sort=False):
        table = g.pivot(index="seed", columns=axis, values="log2").dropna()
        result = coord_slope(table.columns.to_numpy(float), np.exp2(table.to_numpy(float)), level=level)
        out[(kind, int(step))] = result.get("ci")
    return out


def kind_slopes(per_module: pd.DataFrame) -> pd.DataFrame:
    """Per (param, kind, step): the mean of the per-block slopes (NaN if any block's is NaN)."""
    return (per_module.groupby(["param", "kind", "step"], as_index=False)["slope"]
            .agg(lambda s: s.mean() if s.notna().all() else math.nan))


def slope_passes(kind: str, step: int, slope: float, threshold: float) -> bool:
    """The default rule (module docstring)."""
    if not math.isfinite(slope):
        return False
    if step == 0 or (step == 1 and kind in LOGIT_KINDS):
        return slope <= threshold
    return abs(slope) <= threshold


def _num(x: float) -> float | None:
    """JSON has no NaN: a slope that could not be fitted is written as null."""
    return round(float(x), 4) if math.isfinite(x) else None


def verdict(df: pd.DataFrame, param: str, threshold: float = DEFAULT_THRESHOLD,
            statistic: str = DEFAULT_STATISTIC) -> dict:
    """Slopes per module and step, pass/fail per module and overall, for one parametrization."""
    axis = axis_of(df)
    per_module = module_slopes(df[df["param"] == param], statistic)
    if per_module.empty:
        raise ValueError(f"no {statistic!r} records for param = {param!r}")
    per_kind = kind_slopes(per_module)
    intervals = seed_intervals(df[df["param"] == param], statistic)
    modules, failing, growing, shrinking = {}, [], [], []
    for kind in [k for k in KINDS if k in set(per_kind["kind"])]:
        g = per_kind[per_kind["kind"] == kind].sort_values("step")
        by_step = {int(t): float(v) for t, v in zip(g["step"], g["slope"], strict=True)}
        failed = [t for t, v in by_step.items() if not slope_passes(kind, t, v, threshold)]
        blocks = per_module[per_module["kind"] == kind]
        modules[kind] = {
            "description": DESCRIPTIONS[kind],
            "slopes": {str(t): _num(v) for t, v in by_step.items()},
            "slopes_ci": {str(t): None if intervals.get((kind, t)) is None else [_num(x) for x in intervals[(kind, t)]]
                          for t in by_step},
            "threshold": threshold,
            "failed_steps": failed,
            "passed": not failed,
            "max_abs_slope_later": _num(max((abs(v) for t, v in by_step.items() if t >= 2), default=math.nan)),
            "per_block_slopes": {m: {str(int(t)): _num(v) for t, v in zip(b["step"], b["slope"], strict=True)}
                                 for m, b in blocks.groupby("module", sort=False)},
        }
        if failed:
            failing.append(kind)
            bad = [by_step[t] for t in failed]
            if any(not math.isfinite(v) or v > threshold for v in bad):
                growing.append(kind)
            if any(v < -threshold for v in bad):
                shrinking.append(kind)
    return {
        "param": param,
        "passed": not failing,
        "statistic": statistic,
        "threshold": threshold,
        "axis": axis,
        "interval": "90 % over seeds (bootstrap sd x t, mutransfer.optimum_stats.coord_slope); the verdict "
                    "is judged on the slope itself",
        "rule": (f"slope of log2({statistic}) vs log2({axis}), mean over blocks; step 0 (init and first "
                 f"update): slope <= {threshold}; step 1: |slope| <= {threshold} except "
                 f"{' and '.join(LOGIT_KINDS)} may shrink; later steps: |slope| <= {threshold}"),
        "widths": sorted(int(w) for w in df.loc[df["param"] == param, "width"].unique()),
        "axis_values": sorted(int(w) for w in df.loc[df["param"] == param, axis].unique()),
        "steps": sorted(int(t) for t in per_kind["step"].unique()),
        "max_abs_slope_later": _num(max((m["max_abs_slope_later"] for m in modules.values()
                                         if m["max_abs_slope_later"] is not None), default=math.nan)),
        "failing_modules": failing,
        "growing_modules": growing,
        "shrinking_modules": shrinking,
        "modules": modules,
    }


def summary_line(v: dict, config: dict | None = None) -> str:
    """One line: parametrization and setting, PASS or FAIL, the worst slope or the failing modules."""
    config = config or {}
    setting = " ".join(str(config[k]) for k in ("optimizer", "precision") if k in config)
    lr = f" lr={config['lr']:g}" if "lr" in config else ""
    head = f"{v['param']} {setting}{lr}".strip()
    if v["passed"]:
        worst = v["max_abs_slope_later"]
        return f"{head}: PASS (max |slope| from step 2 on: {'n/a' if worst is None else f'{worst:.3f}'})"
    return f"{head}: FAIL ({', '.join(v['failing_modules'])})"




def judge(out_dir: str | Path, threshold: float | None = None, statistic: str | None = None) -> dict:
    """verdict.json from coord.parquet and config.json; returns the verdict of the parametrization under
    test, with the controls under ``compare`` (coord.png is drawn from these files by analysis.coord)."""
    from mutransfer.rundir import read_json

    out = Path(out_dir)
    config = read_json(out / "config.json", "coordinate-check config") if (out / "config.json").exists() else {}
    threshold = threshold if threshold is not None else config.get("threshold", DEFAULT_THRESHOLD)
    statistic = statistic or config.get("statistic", DEFAULT_STATISTIC)
    df = load(out)
    params = list(dict.fromkeys(df["param"]))
    main = config.get("param", params[0])
    verdicts = [verdict(df, p, threshold, statistic) for p in [main, *[p for p in params if p != main]]]
    result = combine(verdicts, config)
    write_json(out / "verdict.json", result)
    return result


def combine(verdicts: list[dict], config: dict) -> dict:
    """The verdict of the parametrization under test (first), the controls under ``compare``, and a
    summary line each: what verdict.json holds."""
    for v in verdicts:
        v["summary_line"] = summary_line(v, config)
    return {**verdicts[0], "compare": {v["param"]: v for v in verdicts[1:]},
            "summary": [v["summary_line"] for v in verdicts]}
