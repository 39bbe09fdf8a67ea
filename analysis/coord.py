"""Coordinate-check verdict and plot, remade from a run directory's ``coord.parquet``.

The verdict is a number per module and step: the least-squares slope of log2(size) against
log2(width). Under μP every slope is near 0; under SP hidden outputs and logits grow (+0.4 to
+3, RECIPE section 6), so a threshold of 0.1 separates the two.

A *module* here is one kind of module across the blocks (e.g. ``attn_out``: the attention output
of every block), and its slope is the mean of the per-block slopes (the slope of the geometric
mean over blocks of the seed-mean size). The μP table acts on a role in every block alike, and
at the tiny family's widths a single block's slope carries about ±0.1 of finite-width and seed
noise, which the mean over blocks halves; the per-block slopes are in verdict.json for diagnosis.

Rule (docs/coord_check.md), with step s = the forward pass after s optimizer steps:
- step 0 (at initialisation, and the first update): no module may grow, slope <= threshold;
- step 1: |slope| <= threshold, except that the output and attention logits may shrink;
- every later step: |slope| <= threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mutransfer.coord import ACTIVATION_KINDS, KINDS, LOGIT_KINDS, UPDATE_KINDS

DEFAULT_THRESHOLD = 0.1
DEFAULT_STATISTIC = "l1"
DESCRIPTIONS = {
    "embedding": "embedding output after the alpha_in multiplier (embed_scale)",
    "attn_out": "attention output (attention.wo) of every block",
    "ffn_out": "MLP output (feed_forward.w2) of every block",
    "residual": "residual stream (block output) of every block",
    "attn_logits": "attention logits attn_scale * q k^T (causal entries) of every block",
    "output_logits": "output logits",
    "dWx.attn_qkv": "update effect dW x of wq, wk, wv in every block",
    "dWx.attn_out": "update effect dW x of wo in every block",
    "dWx.ffn_in": "update effect dW x of w1, w3 in every block",
    "dWx.ffn_out": "update effect dW x of w2 in every block",
    "dWx.output": "update effect of the tied embedding on the output logits",
}


def load(out_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(out_dir) / "coord.parquet")


def fit_slope(widths: np.ndarray, sizes: np.ndarray) -> float:
    """Least-squares slope of log2(size) on log2(width); NaN when a size is not positive and finite."""
    if len(widths) < 2 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        return math.nan
    return float(np.polyfit(np.log2(widths), np.log2(sizes), 1)[0])


def module_slopes(df: pd.DataFrame, statistic: str = DEFAULT_STATISTIC) -> pd.DataFrame:
    """One row per (param, module, kind, step): the slope of the seed-mean size against width."""
    d = df[(df["statistic"] == statistic) & df["kind"].isin(KINDS)]
    sizes = d.groupby(["param", "module", "kind", "step", "width"], as_index=False)["value"].mean()
    rows = []
    for (param, module, kind, step), g in sizes.groupby(["param", "module", "kind", "step"], sort=False):
        g = g.sort_values("width")
        rows.append({"param": param, "module": module, "kind": kind, "step": int(step),
                     "slope": fit_slope(g["width"].to_numpy(float), g["value"].to_numpy(float))})
    return pd.DataFrame(rows)


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
    per_module = module_slopes(df[df["param"] == param], statistic)
    if per_module.empty:
        raise ValueError(f"no {statistic!r} records for param = {param!r}")
    per_kind = kind_slopes(per_module)
    modules, failing, growing, shrinking = {}, [], [], []
    for kind in [k for k in KINDS if k in set(per_kind["kind"])]:
        g = per_kind[per_kind["kind"] == kind].sort_values("step")
        by_step = {int(t): float(v) for t, v in zip(g["step"], g["slope"], strict=True)}
        failed = [t for t, v in by_step.items() if not slope_passes(kind, t, v, threshold)]
        blocks = per_module[per_module["kind"] == kind]
        modules[kind] = {
            "description": DESCRIPTIONS[kind],
            "slopes": {str(t): _num(v) for t, v in by_step.items()},
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
        "rule": (f"slope of log2({statistic}) vs log2(width), mean over blocks; step 0 (init and first "
                 f"update): slope <= {threshold}; step 1: |slope| <= {threshold} except "
                 f"{' and '.join(LOGIT_KINDS)} may shrink; later steps: |slope| <= {threshold}"),
        "widths": sorted(int(w) for w in df.loc[df["param"] == param, "width"].unique()),
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


def plot_steps(steps: list[int]) -> list[int]:
    """Panels: the first two steps, the middle one and the last."""
    if not steps:
        return []
    return sorted({steps[0], steps[min(1, len(steps) - 1)], steps[len(steps) // 2], steps[-1]})


def kind_sizes(df: pd.DataFrame, statistic: str = DEFAULT_STATISTIC) -> pd.DataFrame:
    """Per (param, kind, step, width): geometric mean over blocks of the seed-mean size (``size``),
    and the lowest and highest per-seed geometric mean (``low``, ``high``) for the seed band."""
    d = df[(df["statistic"] == statistic) & df["kind"].isin(KINDS)].copy()
    d["log2"] = np.log2(d["value"].where(d["value"] > 0))
    keys = ["param", "kind", "step", "width"]
    seed_mean = d.groupby([*keys, "module"], as_index=False)["value"].mean()
    seed_mean["log2"] = np.log2(seed_mean["value"].where(seed_mean["value"] > 0))
    line = seed_mean.groupby(keys, as_index=False)["log2"].mean().rename(columns={"log2": "size"})
    per_seed = d.groupby([*keys, "seed"], as_index=False)["log2"].mean()
    band = per_seed.groupby(keys, as_index=False)["log2"].agg(low="min", high="max")
    out = line.merge(band, on=keys)
    for col in ("size", "low", "high"):
        out[col] = np.exp2(out[col])
    return out


def _at_least_width_span(ax, widths: pd.Series) -> None:
    """Give the y axis at least as many octaves as the x axis, so a slope looks like what it is."""
    span = math.log2(widths.max() / widths.min())
    low, high = (math.log2(v) for v in ax.get_ylim())
    if high - low < span:
        mid = (low + high) / 2
        ax.set_ylim(2 ** (mid - span / 2), 2 ** (mid + span / 2))


def plot(df: pd.DataFrame, verdicts: list[dict], path: str | Path, statistic: str = DEFAULT_STATISTIC,
         config: dict | None = None) -> None:
    """coord.png: per parametrization an activation row and an update row, one panel per chosen step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = kind_sizes(df, statistic)
    steps = plot_steps(sorted(int(t) for t in sizes["step"].unique()))
    rows = [(v, kinds) for v in verdicts for kinds in (ACTIVATION_KINDS, UPDATE_KINDS)]
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(3.4 * len(steps), 2.9 * len(rows)), squeeze=False)
    colors = {k: plt.get_cmap("tab10")(i) for group in (ACTIVATION_KINDS, UPDATE_KINDS) for i, k in enumerate(group)}
    for r, (v, kinds) in enumerate(rows):
        for c, step in enumerate(steps):
            ax = axes[r][c]
            for kind in kinds:
                g = sizes[(sizes["param"] == v["param"]) & (sizes["kind"] == kind) & (sizes["step"] == step)]
                if g.empty:
                    continue
                g = g.sort_values("width")
                slope = v["modules"].get(kind, {}).get("slopes", {}).get(str(step))
                label = f"{kind} {slope:+.2f}" if slope is not None else f"{kind} n/a"
                ax.plot(g["width"], g["size"], marker="o", ms=3, color=colors[kind], label=label)
                ax.fill_between(g["width"], g["low"], g["high"], color=colors[kind], alpha=0.25, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            _at_least_width_span(ax, sizes["width"])
            part = "update dW x" if kinds is UPDATE_KINDS else "activations"
            ax.set_title(f"{v['param']}: {part}, step {step}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if c == 0:
                ax.set_ylabel(f"{statistic} (geo. mean over blocks)", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel("width", fontsize=8)
            ax.legend(fontsize=5.5, loc="best", title="module, slope", title_fontsize=5.5)
    lines = [summary_line(v, config) for v in verdicts]
    fig.suptitle("coordinate check: " + "\n".join(lines), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * len(lines) / len(rows) * 2))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def remake(out_dir: str | Path, threshold: float | None = None, statistic: str | None = None) -> dict:
    """Verdict and plot from the files alone: reads coord.parquet and config.json, writes verdict.json
    and coord.png; returns the verdict of the parametrization under test, controls under ``compare``."""
    out = Path(out_dir)
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    threshold = threshold if threshold is not None else config.get("threshold", DEFAULT_THRESHOLD)
    statistic = statistic or config.get("statistic", DEFAULT_STATISTIC)
    df = load(out)
    params = list(dict.fromkeys(df["param"]))
    main = config.get("param", params[0])
    verdicts = [verdict(df, p, threshold, statistic) for p in [main, *[p for p in params if p != main]]]
    result = {**verdicts[0], "compare": {v["param"]: v for v in verdicts[1:]},
              "summary": [summary_line(v, config) for v in verdicts]}
    (out / "verdict.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(df, verdicts, out / "coord.png", statistic, config)
    return result


if __name__ == "__main__":
    import sys

    for summary in remake(sys.argv[1])["summary"]:
        print(summary)
