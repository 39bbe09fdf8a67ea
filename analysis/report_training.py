"""The training section: one summary table, the stages and a figure per run, then all runs compared.

Reads a ``mutransfer train`` directory (config.json, metrics.jsonl, events.jsonl, summary.json);
the curves and stage spans come from ``analysis.training``. An unfinished run (no summary.json)
is still shown, with a note, from the steps logged so far.
"""

from __future__ import annotations

from analysis.report_document import Figure, Heading, Table, fmt, kv_table
from analysis.report_runs import Reader, Run


def training_blocks(run: Run, frames: dict) -> list:
    """The run's blocks; its metrics go into ``frames`` (label -> DataFrame) for the comparison figure."""
    from analysis.training import plot_training, read_events, read_metrics, stage_spans, switch_step

    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    config = r.json("config.json") or {}
    try:
        df = read_metrics(run.path)
    except FileNotFoundError:
        r.note("metrics.jsonl is missing; no training curves")
        return blocks
    except (OSError, UnicodeDecodeError, ValueError) as e:
        r.note(f"metrics.jsonl is not readable ({e}); no training curves")
        return blocks
    frames[run.label] = df
    events = read_events(run.path)
    if r.json("summary.json", required=False) is None:
        r.note("no summary.json: the run is unfinished or was interrupted; showing the steps logged so far")
    blocks.append(summary_table(config, df, switch_step(df, events)))
    spans = stage_spans(df)
    if spans:
        blocks.append(Table(["stage", "steps", "optimizer", "global batch", "sequence length", "tokens at end",
                             "held-out loss at end"],
                            [[s["stage"], f"{s['first_step']}-{s['last_step']}", fmt(s.get("optimizer")),
                              fmt(s.get("global_batch")), fmt(s.get("seq_len")), fmt(s.get("tokens_end")),
                              fmt(s.get("val_loss_end"))] for s in spans]))
    blocks.append(Figure(f"{run.label}/training", plot_training(df, events, run.label),
                         f"{run.label}: loss and held-out loss, LR per group, grad norm, tokens/s, MFU, batch shape; "
                         "dotted: stage boundaries; red: the AdamW -> Muon switch"))
    return blocks


def summary_table(config: dict, df, switch: int | None) -> Table:
    train, par = config.get("train") or {}, config.get("parallel") or {}
    opt = (config.get("config") or {}).get("optimizer") or {}

    def last(col):
        s = df[col].dropna() if col in df.columns else []
        return s.iloc[-1] if len(s) else None

    def median(col):
        s = df[col].dropna() if col in df.columns else []
        return float(s.median()) if len(s) else None

    mfu = median("mfu")
    world = int(df["dp_size"].max()) if "dp_size" in df.columns and df["dp_size"].notna().any() else None
    lock = config.get("hparams_lock") or {}
    no_switch = "none" + (" (optimizer.switch = false: the AdamW-only control)" if opt.get("switch") is False else "")
    return kv_table([
        ("model", ((config.get("config") or {}).get("model") or {}).get("preset")),
        ("precision", train.get("precision")),
        ("data-parallel", "1 process" if world == 1 else f"{par.get('mode', '?')} x {world or '?'} processes"),
        ("hyperparameters", f"{lock['path']} (see Frozen hyperparameters)" if lock.get("path") else None),
        ("steps logged", len(df)), ("tokens", last("tokens")),
        ("final loss", last("loss")), ("final held-out loss", last("val_loss")),
        ("optimizer switch", f"AdamW -> Muon at step {switch}" if switch is not None else no_switch),
        ("median tokens/s", median("tokens_per_s")),
        ("median MFU", f"{100 * mfu:.2f} %" if mfu is not None else "not recorded (no peak FLOP/s for the device)"),
    ])


def comparison_blocks(frames: dict) -> list:
    """One figure of every run's losses, when there is more than one run to compare."""
    if len(frames) < 2:
        return []
    from analysis.training import plot_comparison

    return [Heading("All training runs"),
            Figure("comparison", plot_comparison(frames),
                   "train and held-out loss of every run (e.g. the switch against the AdamW-only control)")]
