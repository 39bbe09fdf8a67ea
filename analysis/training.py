"""Training curves of a full-scale run directory, from its files only (metrics.jsonl, events.jsonl).

    python -m analysis.training RUN_DIR [OUT.png]

One figure per run: loss with the held-out loss, LR per parameter group, grad norm, tokens/s, MFU,
and the batch shape, against the optimizer step. Every panel marks the stage boundaries (dotted,
named at the top) and the AdamW -> Muon switch (solid red), so a jump in the curves can be read
against what changed at that step. A run that logged no MFU (no peak FLOP/s known for its device)
says so in that panel instead of drawing an empty axis.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

SWITCH_COLOR = "tab:red"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file; a torn line (a writer killed mid-line) is skipped, not fatal."""
    return jsonl_rows(Path(path).read_text().splitlines())


def jsonl_rows(lines: list[str]) -> list[dict]:
    """The JSON objects among ``lines``; blank and torn lines are skipped."""
    rows = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir) -> pd.DataFrame:
    """metrics.jsonl as a frame sorted by step, the per-group LRs spread into ``lr/<optimizer>/<role>``
    columns. Raises FileNotFoundError when the file is absent and ValueError when it holds no row."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    rows = [r for r in rows if isinstance(r.get("step"), int)]
    if not rows:
        raise ValueError("metrics.jsonl holds no step rows")
    df = pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    if "lr" in df.columns:
        lrs = pd.DataFrame([r if isinstance(r, dict) else {} for r in df["lr"]], index=df.index)
        df = pd.concat([df.drop(columns="lr"), lrs.add_prefix("lr/")], axis=1)
    return df


def read_events(run_dir) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return read_jsonl(path) if path.is_file() else []


def stage_spans(df: pd.DataFrame) -> list[dict]:
    """Consecutive runs of one stage: name, first and last step, optimizers, batch and sequence shapes."""
    if "stage" not in df.columns:
        return []
    spans = []
    block = (df["stage"] != df["stage"].shift()).cumsum()
    for _, g in df.groupby(block, sort=False):
        span = {"stage": str(g["stage"].iloc[0]), "first_step": int(g["step"].iloc[0]),
                "last_step": int(g["step"].iloc[-1]), "steps": len(g)}
        for col in ("optimizer", "global_batch", "seq_len"):
            if col in g.columns:
                span[col] = [v for v in dict.fromkeys(g[col].dropna().tolist())]
        if "tokens" in g.columns and g["tokens"].notna().any():
            span["tokens_end"] = int(g["tokens"].dropna().iloc[-1])
        if "val_loss" in g.columns and g["val_loss"].notna().any():
            span["val_loss_end"] = float(g["val_loss"].dropna().iloc[-1])
        spans.append(span)
    return spans


def switch_step(df: pd.DataFrame, events: list[dict]) -> int | None:
    """The step the hidden matrices moved to Muon: the ``switch`` event, else the row flagged
    ``switch``, else the first row whose optimizer differs from the first row's."""
    for e in events:
        if e.get("event") == "switch" and isinstance(e.get("step"), int):
            return e["step"]
    if "switch" in df.columns:
        flagged = df.loc[df["switch"].fillna(False).astype(bool), "step"]
        if len(flagged):
            return int(flagged.iloc[0])
    if "optimizer" in df.columns and df["optimizer"].nunique() > 1:
        changed = df.loc[df["optimizer"] != df["optimizer"].iloc[0], "step"]
        return int(changed.iloc[0])
    return None


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df.columns else pd.Series(dtype=float)


def _group(col: str) -> tuple[str, str]:
    """``lr/adamw/embedding`` -> ("adamw", "embedding"); ``lr/embedding`` -> ("", "embedding")."""
    key = col[len("lr/"):]
    opt, _, role = key.rpartition("/")
    return opt, role


def _mark(ax, spans: list[dict], switch: int | None, legend: bool) -> None:
    """Stage boundaries (dotted, named above the axes) and the optimizer switch (solid red)."""
    for span in spans[1:]:
        ax.axvline(span["first_step"] - 0.5, color="grey", ls=":", lw=1)
    if switch is not None:
        ax.axvline(switch - 0.5, color=SWITCH_COLOR, lw=1.4, label="AdamW -> Muon" if legend else None)
    for span in spans:
        mid = (span["first_step"] + span["last_step"]) / 2
        ax.text(mid, 1.01, span["stage"], transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=6.5, color="dimgrey", clip_on=False)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="dimgrey",
            wrap=True)


def _series(ax, step, values, color: str, missing: str, title: str, ylabel: str | None = None,
            from_zero: bool = False) -> None:
    """One metric against step, or a note saying it was not recorded."""
    if values.notna().any():
        ax.plot(step, values, lw=1, color=color)
        if from_zero:
            ax.set_ylim(bottom=0)
        if ylabel:
            ax.set_ylabel(ylabel)
    else:
        _empty(ax, missing)
    ax.set_title(title, fontsize=10, pad=14)


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_training(df: pd.DataFrame, events: list[dict], title: str = "") -> bytes:
    """The six-panel training figure as PNG bytes (see the module docstring)."""
    spans = stage_spans(df)
    switch = switch_step(df, events)
    step = df["step"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    ax_loss, ax_lr, ax_gn, ax_tps, ax_mfu, ax_shape = axes.flat

    loss = _numeric(df, "loss")
    ax_loss.plot(step, loss, lw=1, color="tab:blue", label="train loss")
    val = _numeric(df, "val_loss")
    if val.notna().any():
        ax_loss.plot(step[val.notna()], val.dropna(), "o-", ms=3.5, color="tab:orange", label="held-out loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss", fontsize=10, pad=14)

    lr_cols = [c for c in df.columns if c.startswith("lr/")]
    if lr_cols:
        groups = {col: _group(col) for col in lr_cols}
        roles = list(dict.fromkeys(role for _, role in groups.values()))
        colors = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(roles)}
        for col, (opt, role) in groups.items():
            ax_lr.plot(step, _numeric(df, col), lw=1.2, color=colors[role], ls="--" if opt == "muon" else "-",
                       label=f"{role} ({opt})" if opt else role)
        if (_numeric(df, lr_cols[0]).dropna() > 0).all():
            ax_lr.set_yscale("log")
    else:
        _empty(ax_lr, "no LR recorded")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("LR per parameter group (dashed: Muon)", fontsize=10, pad=14)

    _series(ax_gn, step, _numeric(df, "grad_norm"), "tab:green", "no grad norm recorded",
            "gradient norm (before clipping)")
    _series(ax_tps, step, _numeric(df, "tokens_per_s"), "tab:purple", "no tokens/s recorded", "throughput",
            ylabel="tokens / s", from_zero=True)
    _series(ax_mfu, step, 100 * _numeric(df, "mfu"), "tab:brown",
            "MFU not recorded:\nno peak FLOP/s known for this device\n(set metrics.peak_flops)",
            "model FLOPs utilisation", ylabel="MFU (%)", from_zero=True)

    gb, seq = _numeric(df, "global_batch"), _numeric(df, "seq_len")
    if gb.notna().any() or seq.notna().any():
        ax_shape.step(step, gb, where="post", color="tab:cyan", label="global batch")
        ax_shape.step(step, seq, where="post", color="tab:olive", label="sequence length")
        ax_shape.set_yscale("log", base=2)
    else:
        _empty(ax_shape, "no batch shape recorded")
    ax_shape.set_title("global batch and sequence length", fontsize=10, pad=14)

    for ax in axes.flat:
        _mark(ax, spans, switch, legend=ax is ax_loss)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, loc="best", ncol=2 if ax is ax_lr else 1)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    switch_text = f"; AdamW -> Muon at step {switch}" if switch is not None else "; no optimizer switch"
    fig.suptitle(f"{title}{switch_text}".lstrip("; "), fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def plot_comparison(runs: dict[str, pd.DataFrame]) -> bytes:
    """Loss and held-out loss of several runs on shared axes (e.g. the switch against the AdamW-only control)."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (label, df) in enumerate(runs.items()):
        color = plt.get_cmap("tab10")(i % 10)
        ax_loss.plot(df["step"], _numeric(df, "loss"), lw=1, color=color, label=label)
        val = _numeric(df, "val_loss")
        if val.notna().any():
            ax_val.plot(df["step"][val.notna()], val.dropna(), "o-", ms=3, color=color, label=label)
        switch = switch_step(df, [])
        if switch is not None:
            for ax in (ax_loss, ax_val):
                ax.axvline(switch - 0.5, color=color, lw=1, ls="--")
    for ax, name in ((ax_loss, "train loss"), (ax_val, "held-out loss")):
        ax.set_title(f"{name} (dashed: each run's switch to Muon)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m analysis.training RUN_DIR [OUT.png]", file=sys.stderr)
        return 2
    run = Path(argv[0])
    df = read_metrics(run)
    out = Path(argv[1]) if len(argv) == 2 else run / "training.png"
    out.write_bytes(plot_training(df, read_events(run), run.name))
    for span in stage_spans(df):
        print(f"{span['stage']:>14}: steps {span['first_step']}-{span['last_step']} "
              f"optimizer {'/'.join(span.get('optimizer', []))} val {_fmt(span.get('val_loss_end'))}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
