"""Plots of a sweep directory, from its files only (trials.parquet, config.json, importances.json).

    python -m analysis.sweep DIR      # (re)draws DIR/plots/*.png

- optimization_history.png: each trial's value by trial number (pruned ones at their last reported
  loss; failed and diverged ones at the top edge, so failures stay visible) and the best so far;
- params.png: each searched hyperparameter against the objective, log axes where the search was log;
- importances.png: Optuna's fANOVA and PED-ANOVA importances, computed when the sweep ended.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STATE_STYLE = {"COMPLETE": ("tab:blue", "o"), "PRUNED": ("tab:orange", "v"), "FAIL": ("tab:red", "x")}


def load(out_dir) -> tuple[pd.DataFrame, dict, dict]:
    out = Path(out_dir)
    df = pd.read_parquet(out / "trials.parquet")
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    imp_path = out / "importances.json"
    imp = json.loads(imp_path.read_text()) if imp_path.is_file() else {}
    return df, cfg, imp


def _last_value(row) -> float:
    values = row["intermediate_values"]
    return float(values[-1]) if values is not None and len(values) else math.nan


def _top_edge(values: pd.Series) -> float:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 1.0
    return float(finite.max() + 0.05 * (finite.max() - finite.min() or 1.0))


def plot_history(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    last = df.apply(_last_value, axis=1) if len(df) else pd.Series(dtype=float)
    shown = df["value"].where(df["state"] == "COMPLETE", last)
    top = _top_edge(shown)
    for state, (color, marker) in STATE_STYLE.items():
        part = shown[df["state"] == state]
        if part.empty:
            continue
        y = part.where(np.isfinite(part), top) if state != "FAIL" else np.full(len(part), top)
        ax.scatter(df.loc[part.index, "number"], y, c=color, marker=marker,
                   label=f"{state.lower()} ({len(part)})", zorder=3)
    done = df[df["state"] == "COMPLETE"].sort_values("number")
    if not done.empty:
        ax.step(done["number"], done["value"].cummin(), where="post", color="black", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (held-out loss)")
    ax.set_title("optimization history")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:  # stopped before any trial reported
        ax.text(0.5, 0.5, "no trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(df: pd.DataFrame, cfg: dict, path: Path) -> None:
    names = [c[len("params_"):] for c in df.columns if c.startswith("params_")]
    if not names:
        return
    search = cfg.get("resolved", {}).get("search", {})
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    done = df[df["state"] == "COMPLETE"]
    pruned = df[df["state"] == "PRUNED"]
    pruned_last = pruned.apply(_last_value, axis=1) if len(pruned) else pd.Series(dtype=float)
    for ax, name in zip(axes.flat, names, strict=False):
        if len(pruned):
            ax.scatter(pruned[f"params_{name}"], pruned_last, c="tab:orange", marker="v", s=14, alpha=0.5,
                       label="pruned (last loss)")
        ax.scatter(done[f"params_{name}"], done["value"], c=done["number"], cmap="viridis", s=22)
        space = search.get(name, {})
        if space.get("log"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if "low" in space and "high" in space:
            pad = 0.0 if space.get("log") else 0.03 * (space["high"] - space["low"])
            ax.set_xlim(space["low"] - pad, space["high"] + pad)
        ax.set_xlabel(name)
        ax.set_ylabel("objective")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("hyperparameter vs objective (complete: colour = trial number; pruned: orange, last loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importances(imp: dict, path: Path) -> None:
    usable = {k: v for k, v in imp.items() if v and "error" not in v}
    if not usable:
        return
    fig, axes = plt.subplots(1, len(usable), figsize=(4.5 * len(usable), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes.flat, usable.items(), strict=True):
        items = sorted(values.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set_title(f"importance ({name})")
        ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(out_dir) -> list[Path]:
    """Draw every plot into ``out_dir/plots``; returns the files written."""
    df, cfg, imp = load(out_dir)
    plots = Path(out_dir) / "plots"
    plots.mkdir(exist_ok=True)
    plot_history(df, plots / "optimization_history.png")
    plot_params(df, cfg, plots / "params.png")
    plot_importances(imp, plots / "importances.png")
    return sorted(plots.glob("*.png"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m analysis.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    for p in plot_sweep(argv[0]):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
