"""The transfer-check figure, drawn from a run directory's files alone (runs.jsonl, verdict.json).

    python -m analysis.transfer DIR      # (re)draws DIR/transfer.png

One panel per variant: held-out loss against log2 base LR (or base weight decay, when the check
tunes it) for each axis value (the seed mean,
with a shaded band from the lowest to the highest seed), each optimum as a star with its
confidence interval as a horizontal error bar. For the token-horizon and batch axes a last panel
shows the optimum against the axis value with the fitted power law and its prediction (and the
weight-decay timescale rule's, when tuned).
(``mutransfer transfer-check`` judges and writes verdict.json: proxy_sweeps.transfer_verdict.)
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_runs(out_dir) -> list[dict]:
    path = Path(out_dir) / "runs.jsonl"
    runs = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def knob(verdict: dict) -> tuple[str, str]:
    """The grid's record key and its name: ``("lr_log2", "LR")`` or ``("wd_log2", "weight decay")``."""
    return verdict.get("grid_key", "lr_log2"), verdict.get("knob", "LR")


def curves(runs: list[dict], key: str = "lr_log2") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """log2 grid value, seed-mean loss, lowest and highest seed loss (NaN where a seed diverged)."""
    by_lr = defaultdict(list)
    for r in runs:
        by_lr[float(r[key])].append(r["loss"] if r["status"] == "ok" and r["loss"] is not None else math.nan)
    xs = np.array(sorted(by_lr))
    rows = [np.array(by_lr[x], dtype=float) for x in xs]
    mean = np.array([v.mean() if np.isfinite(v).all() else math.nan for v in rows])
    low = np.array([v.min() if np.isfinite(v).all() else math.nan for v in rows])
    high = np.array([v.max() if np.isfinite(v).all() else math.nan for v in rows])
    return xs, mean, low, high


def _loss_panel(ax, name: str, info: dict, runs: list[dict], values: list, verdict: dict, colors) -> list[float]:
    key, label = knob(verdict)
    lows = []
    for v, color in zip(values, colors, strict=True):
        rs = [r for r in runs if r["variant"] == name and int(r["value"]) == v]
        if not rs:
            continue
        xs, mean, low, high = curves(rs, key)
        ax.plot(xs, mean, "o-", color=color, ms=3.5, label=f"{verdict['axis']} {v}")
        ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
        if np.isfinite(mean).any():
            lows.append(float(np.nanmin(mean)))
        o = info["values"][str(v)]
        if o.get(key) is not None and o.get("loss") is not None:
            ci = o.get("ci")
            xerr = None if not ci else [[o[key] - ci[0]], [ci[1] - o[key]]]
            ax.errorbar([o[key]], [o["loss"]], xerr=xerr, fmt="*", ms=12, color=color, mec="black",
                        ecolor=color, capsize=3, zorder=4)
    drift = info.get("drift") or {}
    title = name
    if drift.get("estimate") is not None:
        ci = drift.get("ci")
        title += f": drift {drift['estimate']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + " oct."
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"log2 base {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return lows


def _law_panel(ax, verdict: dict) -> None:
    key, label = knob(verdict)
    law = verdict["law"]["law"]
    primary = verdict["primary"]
    values = verdict["values"]
    info = verdict["variants"][primary]["values"]
    xs, ys, lo, hi = [], [], [], []
    for v in values:
        o = info[str(v)]
        if o.get(key) is None:
            continue
        ci = o.get("ci") or [o[key], o[key]]
        xs.append(math.log2(v))
        ys.append(o[key])
        lo.append(o[key] - ci[0])
        hi.append(ci[1] - o[key])
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color="black", capsize=3, label=f"{primary} optimum")
    if law.get("a") and law.get("beta"):
        a, beta = law["a"]["estimate"], law["beta"]["estimate"]
        grid = np.linspace(math.log2(values[0]), math.log2(values[-1]), 50)
        ax.plot(grid, a - beta * grid, "--", color="tab:blue", label=f"fit below {values[-1]}: beta {beta:.2f}")
    pred = law.get("prediction")
    if pred and pred.get("ci"):
        ax.errorbar([math.log2(values[-1])], [pred["estimate"]],
                    yerr=[[pred["estimate"] - pred["ci"][0]], [pred["ci"][1] - pred["estimate"]]], fmt="s",
                    color="tab:blue", capsize=4, label="prediction")
    rule = verdict["law"].get("timescale")
    if rule and rule.get("prediction"):
        p = rule["prediction"]
        ci = p.get("ci") or [p["estimate"], p["estimate"]]
        ax.errorbar([math.log2(values[-1])], [p["estimate"]], yerr=[[p["estimate"] - ci[0]], [ci[1] - p["estimate"]]],
                    fmt="D", color="tab:red", capsize=4, label="timescale rule (lambda eta T const.)")
    ax.set_xlabel(f"log2 {verdict['axis']}")
    ax.set_ylabel(f"optimum log2 {label}")
    ax.set_title(f"power law: log2 {label}* = a - beta log2 value", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _variant_width(runs: list[dict], name: str) -> int:
    """The smallest model width among a variant's runs (0 without one): the order its panels go in."""
    return min((int(r["width"]) for r in runs if r["variant"] == name and r.get("width") is not None), default=0)


def draw(out_dir) -> Path:
    """transfer.png from runs.jsonl and verdict.json; returns its path."""
    out = Path(out_dir)
    verdict = json.loads((out / "verdict.json").read_text())
    runs = read_runs(out)
    names = sorted(verdict["variants"], key=lambda n: _variant_width(runs, n))  # w32, w64, w128, not as text
    values = verdict["values"]
    panels = len(names) + (1 if verdict.get("law") else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(5.5 * max(1, panels), 4.2), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
    lows = []
    for ax, name in zip(axes.flat, names, strict=False):
        lows += _loss_panel(ax, name, verdict["variants"][name], runs, values, verdict, colors)
    axes.flat[0].set_ylabel("held-out loss (seed mean; band: seed range)")
    if lows:
        for ax in list(axes.flat)[:len(names)]:
            ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    if verdict.get("law"):
        _law_panel(axes.flat[len(names)], verdict)
    level = int(round(100 * verdict["confidence"]))
    fig.suptitle(f"{knob(verdict)[1]} transfer across {verdict['axis']} ({verdict['outcome']}; stars: optima "
                 f"with {level} % intervals)")
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=110)
    plt.close(fig)
    return out / "transfer.png"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m analysis.transfer TRANSFER_DIR", file=sys.stderr)
        return 2
    print(draw(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
