"""The LR-transfer verdict from a transfer-check directory's runs.jsonl (RECIPE section 6).

    python -m analysis.transfer DIR      # (re)writes DIR/verdict.json and DIR/transfer.png

Per parametrization and width: the held-out loss averaged over seeds at each LR (an LR where any
seed diverged counts as NaN and is left out), a parabola in log2(LR) through the 3-5 grid points
around the minimum (the vertex beats the grid argmin: it interpolates between x2 steps), and the
optimum. The shift is the spread of the optima across widths, in octaves (log2 units): good muP
shows about 0, SP about one octave lost per width doubling.
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

MUP_SHIFT_GOAL = 0.5  # octaves over the whole width span
MIN_SPAN = 8  # widest / narrowest
SP_MARGIN = 0.5  # SP's shift must exceed muP's by this much to count as "visibly worse"


def read_runs(out_dir) -> list[dict]:
    path = Path(out_dir) / "runs.jsonl"
    runs = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """log2 LR and the seed-mean loss (NaN where any seed diverged or failed), sorted by LR."""
    by_lr = defaultdict(list)
    for r in runs:
        by_lr[float(r["lr_log2"])].append(r["loss"] if r["status"] == "ok" and r["loss"] is not None else math.nan)
    xs = np.array(sorted(by_lr))
    ys = np.array([np.mean(by_lr[x]) if all(math.isfinite(v) for v in by_lr[x]) else math.nan for x in xs])
    return xs, ys


def fit_optimum(xs: np.ndarray, ys: np.ndarray) -> dict:
    """Vertex of a parabola through the (up to) 5 finite points around the argmin, in log2 LR."""
    ok = np.isfinite(ys)
    fx, fy = xs[ok], ys[ok]
    if len(fx) == 0:
        return {"lr_log2": None, "lr": None, "loss": None, "method": "none", "at_edge": None, "points": 0}
    i = int(np.argmin(fy))
    lo, hi = max(0, i - 2), min(len(fx), i + 3)
    wx, wy = fx[lo:hi], fy[lo:hi]
    result = {"grid_argmin_lr_log2": float(fx[i]),
              "at_edge": bool(fx[i] in (xs[0], xs[-1])),  # the optimum may lie outside the grid
              "next_to_divergence": bool(i == len(fx) - 1 and fx[i] != xs[-1]),
              "points": int(len(wx))}
    if len(wx) >= 3:
        a, b, c = np.polyfit(wx, wy, 2)
        if a > 0 and wx[0] <= -b / (2 * a) <= wx[-1]:
            x = float(-b / (2 * a))
            result.update(lr_log2=x, lr=2.0**x, loss=float(c - b * b / (4 * a)), method="parabola",
                          coeffs=[float(a), float(b), float(c)])
            return result
    result.update(lr_log2=float(fx[i]), lr=2.0 ** float(fx[i]), loss=float(fy[i]), method="grid argmin")
    return result


def seed_optima(runs: list[dict]) -> list[float]:
    by_seed = defaultdict(list)
    for r in runs:
        by_seed[r["seed"]].append(r)
    optima = [fit_optimum(*curve(rs))["lr_log2"] for _, rs in sorted(by_seed.items())]
    return [x for x in optima if x is not None]


def shift_summary(optima: dict[int, float | None]) -> dict:
    pts = [(w, x) for w, x in sorted(optima.items()) if x is not None]
    if len(pts) < 2:
        return {"shift_octaves": None, "drift_octaves": None, "slope_octaves_per_doubling": None}
    ws = np.log2([w for w, _ in pts])
    xs = np.array([x for _, x in pts])
    return {
        "shift_octaves": float(xs.max() - xs.min()),  # spread over all widths
        "drift_octaves": float(xs[-1] - xs[0]),  # widest minus narrowest (negative: the optimum fell)
        "slope_octaves_per_doubling": float(np.polyfit(ws, xs, 1)[0]),
    }


def analyze(out_dir) -> dict:
    """verdict.json and transfer.png from runs.jsonl; returns the verdict."""
    out = Path(out_dir)
    runs = read_runs(out)
    groups = defaultdict(list)
    for r in runs:
        groups[(r["parametrization"], r["width"])].append(r)
    params = sorted({p for p, _ in groups}, key=lambda p: ("mup", "sp", "xmodel").index(p))
    widths = sorted({w for _, w in groups})
    verdict: dict = {"parametrizations": {}, "widths": widths,
                     "span": widths[-1] / widths[0] if widths else None,
                     "goal": {"mup_shift_octaves_max": MUP_SHIFT_GOAL, "min_span": MIN_SPAN,
                              "sp_margin_octaves": SP_MARGIN}}
    for p in params:
        per_width = {}
        for w in widths:
            rs = groups.get((p, w), [])
            opt = fit_optimum(*curve(rs))
            seeds = seed_optima(rs)
            opt["seed_optima_lr_log2"] = seeds
            opt["seed_spread_octaves"] = float(max(seeds) - min(seeds)) if len(seeds) > 1 else None
            opt["runs"] = len(rs)
            opt["diverged"] = sum(r["status"] == "diverged" for r in rs)
            per_width[str(w)] = opt
        verdict["parametrizations"][p] = {
            "widths": per_width,
            **shift_summary({w: per_width[str(w)]["lr_log2"] for w in widths}),
        }
    verdict.update(judge(verdict))
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    plot(out, groups, verdict)
    return verdict


def judge(verdict: dict) -> dict:
    reasons = []
    ps = verdict["parametrizations"]
    if not verdict["span"] or verdict["span"] < MIN_SPAN:
        reasons.append(f"width span {verdict['span']} is below {MIN_SPAN}x")
    mup, sp = ps.get("mup"), ps.get("sp")
    if mup is None or mup["shift_octaves"] is None:
        reasons.append("no muP optimum at two widths or more")
    else:
        if mup["shift_octaves"] > MUP_SHIFT_GOAL:
            reasons.append(f"muP optimum shifts {mup['shift_octaves']:.2f} octaves (goal <= {MUP_SHIFT_GOAL})")
        edges = [w for w, o in mup["widths"].items() if o.get("at_edge")]
        if edges:
            reasons.append(f"muP optimum at the edge of the LR grid for width(s) {edges}: widen the grid")
        if sp is not None and sp["shift_octaves"] is not None and \
                sp["shift_octaves"] < mup["shift_octaves"] + SP_MARGIN:
            reasons.append(f"SP shift {sp['shift_octaves']:.2f} is not visibly above muP's "
                           f"{mup['shift_octaves']:.2f} (margin {SP_MARGIN})")
    return {"pass": not reasons, "reasons": reasons}


def plot(out: Path, groups: dict, verdict: dict) -> None:
    params = list(verdict["parametrizations"])
    if not params:
        return
    widths = verdict["widths"]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.2), squeeze=False, sharey=True)
    lows = []
    for ax, p in zip(axes.flat, params, strict=True):
        info = verdict["parametrizations"][p]
        for w, color in zip(widths, colors, strict=True):
            xs, ys = curve(groups.get((p, w), []))
            ax.plot(xs, ys, "o-", color=color, ms=3.5, label=f"width {w}")
            if np.isfinite(ys).any():
                lows.append(np.nanmin(ys))
            opt = info["widths"][str(w)]
            if opt["lr_log2"] is not None:
                ax.plot([opt["lr_log2"]], [opt["loss"]], marker="*", ms=13, color=color, mec="black", zorder=4)
        shift = info["shift_octaves"]
        ax.set_title(f"{p}: optimum shift {shift:.2f} octaves" if shift is not None else p)
        ax.set_xlabel("log2 base LR")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[0].set_ylabel("held-out loss (mean over seeds)")
    if lows:
        lo = min(lows)
        axes.flat[0].set_ylim(lo - 0.05, lo + 1.0)
    fig.suptitle("LR transfer across widths (star: parabola-fit optimum)")
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=110)
    plt.close(fig)


def format_verdict(verdict: dict) -> str:
    lines = []
    for p, info in verdict["parametrizations"].items():
        cells = []
        for w, o in info["widths"].items():
            x = o["lr_log2"]
            cells.append(f"{w}: " + ("-" if x is None else f"2^{x:.2f}" + (" (edge)" if o["at_edge"] else "")))
        shift = info["shift_octaves"]
        lines.append(f"{p:>6}: optimum by width  " + ", ".join(cells)
                     + (f"  | shift {shift:.2f} octaves, drift {info['drift_octaves']:+.2f}" if shift is not None
                        else ""))
    lines.append("verdict: " + ("PASS" if verdict["pass"] else "FAIL: " + "; ".join(verdict["reasons"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m analysis.transfer TRANSFER_DIR", file=sys.stderr)
        return 2
    print(format_verdict(analyze(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
