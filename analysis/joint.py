"""The joint-check figure, drawn from a run directory's files alone (runs.jsonl, verdict.json).

    python -m analysis.joint DIR      # (re)draws DIR/joint.png

Left: held-out loss against log2 base LR at the target (seed mean, band from the lowest to the
highest seed), a vertical line for each prediction (muP alone, each law, all laws), the measured
optimum as a star with its confidence interval shaded. Right, when the proxy was measured in the
same run: the proxy's curve and optimum. (The verdict: ``proxy_sweeps.joint``.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.transfer import curves, read_runs  # noqa: E402

FIGURE = "joint.png"
SIDE = {"proxy": 0, "target": 1}
LINE_STYLES = ["-", "--", "-.", ":"]


def _curve_panel(ax, runs: list[dict], info: dict, color: str, label: str) -> None:
    xs, mean, low, high = curves(runs)
    if len(xs):
        ax.plot(xs, mean, "o-", color=color, ms=3.5, label=f"{label} (seed mean)")
        ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
    x, ci = info.get("lr_log2"), info.get("ci")
    if x is not None:
        if ci:
            ax.axvspan(ci[0], ci[1], color=color, alpha=0.12, lw=0)
        y = info.get("loss")
        if y is not None:
            xerr = None if not ci else [[x - ci[0]], [ci[1] - x]]
            ax.errorbar([x], [y], xerr=xerr, fmt="*", ms=13, color=color, mec="black", ecolor=color, capsize=3,
                        zorder=4, label=f"measured optimum {x:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    ax.set_xlabel("log2 base LR")
    ax.grid(alpha=0.3)
    if np.isfinite(mean).any():
        lo = float(np.nanmin(mean))
        ax.set_ylim(lo - 0.05, lo + 0.6)


def draw(out_dir) -> Path:
    """joint.png from runs.jsonl and verdict.json; returns its path."""
    out = Path(out_dir)
    verdict = json.loads((out / "verdict.json").read_text())
    runs = read_runs(out)
    proxy, target = verdict["proxy"], verdict["target"]
    measured = proxy.get("source") == "measured"
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(7.5 + (5 if measured else 0), 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if measured else [1]})
    ax = axes.flat[0]
    _curve_panel(ax, [r for r in runs if int(r["value"]) == SIDE["target"]], target, "black", "target")
    colors = plt.cm.tab10(np.arange(len(verdict["predictions"])))
    for i, row in enumerate(verdict["predictions"]):
        x = row.get("predicted_lr_log2")
        if x is None:
            continue
        err = row["error"]
        note = "" if err.get("estimate") is None else f": error {err['estimate']:+.2f}"
        if err.get("ci"):
            note += f" [{err['ci'][0]:+.2f}, {err['ci'][1]:+.2f}]"
        ax.axvline(x, color=colors[i], ls=LINE_STYLES[i % len(LINE_STYLES)], lw=1.6,
                   label=f"{row['name']} {x:.2f}{note} ({row['outcome']})")
    ax.set_ylabel("held-out loss (seed mean; band: seed range)")
    ax.set_title(f"target: width {target['width']}, depth {target['depth']}, {target.get('steps')} steps x batch "
                 f"{target.get('batch_size')}", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    if measured:
        _curve_panel(axes.flat[1], [r for r in runs if int(r["value"]) == SIDE["proxy"]], proxy, "tab:gray", "proxy")
        axes.flat[1].set_title(f"proxy: width {proxy['width']}, depth {proxy['depth']}, {proxy.get('steps')} steps x "
                               f"batch {proxy.get('batch_size')}", fontsize=10)
        axes.flat[1].legend(fontsize=7, loc="upper right")
    level = int(round(100 * verdict["confidence"]))
    fig.suptitle(f"joint check: {verdict['outcome']} (goal +-{verdict['goal_octaves']:g} octave; {level} % intervals; "
                 "lines: predictions)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / FIGURE, dpi=110)
    plt.close(fig)
    return out / FIGURE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m analysis.joint JOINT_CHECK_DIR", file=sys.stderr)
        return 2
    print(draw(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
