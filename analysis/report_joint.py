"""The joint-check section: does the proxy's LR, carried by muP and the fitted laws, land on the target's?

Shows what ``mutransfer transfer-check`` wrote for a file with a [target] table: both sides' model
and budget, the proxy's optimum (the lock's or measured), each law's correction, the target's
measured optimum, and a row per prediction (muP alone, each law, all laws) with its error and
outcome; the state of the runs; joint.png. The verdict is the command's (proxy_sweeps.joint).
"""

from __future__ import annotations

from pathlib import Path

from analysis.report_document import Heading, Para, Table, fmt
from analysis.report_runs import Reader, Run, load_json_quiet
from analysis.report_transfer import est_cell, lr_cell, runs_blocks


def is_joint_dir(path: Path) -> bool:
    """A joint check's directory (its config.json or verdict.json says so); shown in the transfer section."""
    found = [load_json_quiet(path / name) for name in ("config.json", "verdict.json")]
    return any(isinstance(obj, dict) and obj.get("check") == "joint" for obj in found)


def joint_blocks(run: Run) -> list:
    blocks: list = [Heading(run.label)]
    r = Reader(run, blocks)
    verdict = r.json("verdict.json")
    if verdict is not None:
        blocks += verdict_blocks(verdict)
    rows = r.jsonl("runs.jsonl")
    if rows is not None:
        blocks += runs_blocks(rows, r)
    fig = r.png("joint.png", "held-out loss against log2 LR at the target, a line per prediction, the measured "
                             "optimum starred with its interval")
    if fig:
        blocks.append(fig)
    return blocks


def _side(d: dict) -> list:
    return [fmt(d.get("width")), fmt(d.get("depth")), fmt(d.get("steps")), fmt(d.get("batch_size")),
            fmt(d.get("tokens")), lr_cell(d)]


def verdict_blocks(v: dict) -> list:
    outcome = str(v.get("outcome") or "inconclusive").lower()
    blocks: list = [Para(f"Joint verdict: {outcome.upper()}: " + "; ".join(v.get("reasons") or []), status=outcome)]
    proxy, target = v.get("proxy") or {}, v.get("target") or {}
    blocks.append(Table(["side", "width", "depth", "steps", "batch", "tokens", "optimum log2 LR"],
                        [[f"proxy ({proxy.get('source', '-')})", *_side(proxy)],
                         ["target (measured)", *_side(target)]]))
    laws = v.get("laws") or {}
    if laws:
        terms = [f"{kind}: beta {fmt(t.get('beta'))}, {t.get('unit')} x{fmt(t['target'] / t['proxy'])}: "
                 f"{t.get('octaves', 0):+.2f} octave (its check: {t.get('law_outcome')})" for kind, t in laws.items()]
        blocks.append(Para("Laws: " + "; ".join(terms) + "."))
    goal = v.get("goal_octaves")
    blocks.append(Table(["prediction", "predicted log2 LR", f"error, measured - predicted (goal +-{fmt(goal)})",
                         "outcome", "error's interval from the optima alone"],
                        [[p.get("name"), est_cell({"estimate": p.get("predicted_lr_log2"), "ci": p.get("predicted_ci")},
                                                  sign=False),
                          est_cell(p.get("error")), p.get("outcome"), _optima_only(p.get("error") or {})]
                         for p in v.get("predictions") or []]))
    blocks.append(Para("The error's interval holds the optima's noise and the laws' (their bootstrap draws of beta); "
                       "the last column leaves the laws' out."))
    return blocks


def _optima_only(error: dict) -> str:
    ci = error.get("optima_only_ci")
    return "the same (no law noise)" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
