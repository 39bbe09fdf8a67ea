"""The coordinate-check figure, drawn from a run directory's files alone.

Reads ``coord.parquet`` (one row per axis value, seed, step, module, statistic) and
``verdict.json`` (written by ``mutransfer coord-check``, which judges) and draws ``coord.png``:
per parametrization an activation row and an update row, one panel per chosen step, the size of
each kind of module against the axis (width or depth) with the seed band, and its slope.

    python -m analysis.coord DIR      # (re)draws DIR/coord.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_STATISTIC = "l1"


def load(out_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(out_dir) / "coord.parquet")


def axis_of(df: pd.DataFrame) -> str:
    return str(df["axis"].iloc[0]) if "axis" in df.columns and len(df) else "width"


def kinds_of(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(activation kinds, update kinds) in the order the recorder wrote them."""
    kinds = [k for k in dict.fromkeys(df["kind"]) if k != "loss"]
    return [k for k in kinds if not k.startswith("dWx.")], [k for k in kinds if k.startswith("dWx.")]


def summary_line(v: dict) -> str:
    return v.get("summary_line") or f"{v['param']}: {'PASS' if v['passed'] else 'FAIL'}"


def plot_steps(steps: list[int]) -> list[int]:
    """Panels: the first two steps, the middle one and the last."""
    if not steps:
        return []
    return sorted({steps[0], steps[min(1, len(steps) - 1)], steps[len(steps) // 2], steps[-1]})


def kind_sizes(df: pd.DataFrame, statistic: str = DEFAULT_STATISTIC) -> pd.DataFrame:
    """Per (param, kind, step, axis value): geometric mean over blocks of the seed-mean size (``size``),
    and the lowest and highest per-seed geometric mean (``low``, ``high``) for the seed band."""
    d = df[(df["statistic"] == statistic) & (df["kind"] != "loss")].copy()
    d["log2"] = np.log2(d["value"].where(d["value"] > 0))
    keys = ["param", "kind", "step", axis_of(df)]
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


def plot(df: pd.DataFrame, verdicts: list[dict], path: str | Path, statistic: str = DEFAULT_STATISTIC) -> None:
    """coord.png: per parametrization an activation row and an update row, one panel per chosen step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = axis_of(df)
    activation_kinds, update_kinds = kinds_of(df)
    sizes = kind_sizes(df, statistic)
    steps = plot_steps(sorted(int(t) for t in sizes["step"].unique()))
    rows = [(v, kinds) for v in verdicts for kinds in (activation_kinds, update_kinds)]
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(3.4 * len(steps), 2.9 * len(rows)), squeeze=False)
    colors = {k: plt.get_cmap("tab10")(i) for group in (activation_kinds, update_kinds) for i, k in enumerate(group)}
    for r, (v, kinds) in enumerate(rows):
        for c, step in enumerate(steps):
            ax = axes[r][c]
            for kind in kinds:
                g = sizes[(sizes["param"] == v["param"]) & (sizes["kind"] == kind) & (sizes["step"] == step)]
                if g.empty:
                    continue
                g = g.sort_values(axis)
                slope = v["modules"].get(kind, {}).get("slopes", {}).get(str(step))
                label = f"{kind} {slope:+.2f}" if slope is not None else f"{kind} n/a"
                ax.plot(g[axis], g["size"], marker="o", ms=3, color=colors[kind], label=label)
                ax.fill_between(g[axis], g["low"], g["high"], color=colors[kind], alpha=0.25, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            _at_least_width_span(ax, sizes[axis])
            part = "update dW x" if kinds is update_kinds else "activations"
            ax.set_title(f"{v['param']}: {part}, step {step}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if c == 0:
                ax.set_ylabel(f"{statistic} (geo. mean over blocks)", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel(axis, fontsize=8)
            ax.legend(fontsize=5.5, loc="best", title="module, slope", title_fontsize=5.5)
    lines = [summary_line(v) for v in verdicts]
    fig.suptitle("coordinate check: " + "\n".join(lines), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * len(lines) / len(rows) * 2))
    fig.savefig(path, dpi=110)
    plt.close(fig)




def draw(out_dir: str | Path) -> Path:
    """coord.png from coord.parquet and verdict.json; returns its path."""
    out = Path(out_dir)
    verdict = json.loads((out / "verdict.json").read_text())
    verdicts = [verdict, *verdict.get("compare", {}).values()]
    plot(load(out), verdicts, out / "coord.png", verdict.get("statistic", DEFAULT_STATISTIC))
    return out / "coord.png"


if __name__ == "__main__":
    import sys

    print(draw(sys.argv[1]))
