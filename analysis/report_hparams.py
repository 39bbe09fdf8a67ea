"""The frozen-hyperparameters section: the lock files, whether they were edited, and where they came from.

A lock file (``mutransfer freeze``) carries the base hyperparameters, the shape they belong to,
provenance and a content hash. The hash is checked here as the lock file format defines it
(sha256 of the canonical JSON of every field but ``content_hash``), re-implemented in a few lines
so that the report needs no torch or mutransfer import. A training run's config.json records the
lock it trained with; that is shown here too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from analysis.report_document import Heading, Note, Para, Table, flatten, fmt, kv_table, passed
from analysis.report_runs import LOCK_FORMAT_PREFIX, Run, load_json_quiet


def content_hash(body: dict) -> str:
    """The lock's hash of its body (as mutransfer.lockfile writes it)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def lock_files(run: Run) -> list[tuple[Path, str]]:
    """(path, label) of the lock files a run stands for: itself, or the *.lock.json in its directory."""
    if run.path.is_file():
        return [(run.path, run.label)]
    return [(p, f"{run.label}/{p.name}") for p in sorted(run.path.glob("*.lock.json")) if p.is_file()]


def lock_blocks(files: list[tuple[Path, str]]) -> list:
    blocks: list = []
    for path, label in files:
        blocks.append(Heading(label))
        obj = load_json_quiet(path)
        if not isinstance(obj, dict):
            blocks.append(Note(f"{label}: not readable JSON; no frozen hyperparameters shown"))
            continue
        if not str(obj.get("format", "")).startswith(LOCK_FORMAT_PREFIX):
            blocks.append(Note(f"{label}: format = {obj.get('format')!r}, not a mutransfer lock file"))
        ok = obj.get("content_hash") == content_hash({k: v for k, v in obj.items() if k != "content_hash"})
        blocks.append(Para(f"content hash {obj.get('content_hash')}: "
                           + ("matches the contents" if ok else "DOES NOT match the contents (the file was edited)"),
                           status=passed(ok)))
        prov = obj.get("provenance") or {}
        if "trial_number" in prov:
            objective, proxy = prov.get("objective") or {}, prov.get("proxy") or {}
            blocks.append(Para(f"Trial {prov['trial_number']} of study {prov.get('study')!r}: held-out loss "
                               f"{fmt(objective.get('value'))} (seed std {fmt(objective.get('seed_std'))} over "
                               f"{fmt(objective.get('seeds'))} seed(s)); proxy {proxy.get('preset')} at width "
                               f"{proxy.get('width')}, depth {proxy.get('depth')}, {proxy.get('parametrization')}; "
                               f"frozen {prov.get('frozen_at', '?')}."))
        blocks += hparams_blocks(obj)
    return blocks


def hparams_blocks(obj: dict) -> list:
    """The base hyperparameters, the shape they belong to, any fitted laws and the provenance of one lock."""
    blocks: list = []
    hp = obj.get("hparams") or {}
    searched = set((obj.get("provenance") or {}).get("searched") or [])
    if hp and searched:
        blocks.append(Table(["base hyperparameter", "value", "origin"],
                            [[k, fmt(v, 6), "searched" if k in searched else "fixed"] for k, v in hp.items()]))
    elif hp:
        blocks.append(Table(["base hyperparameter", "value"], [[k, fmt(v, 6)] for k, v in hp.items()]))
    param, model = obj.get("param") or {}, obj.get("proxy_model") or {}
    shape = [*[(f"param.{k}", v) for k, v in param.items()],
             *[(f"proxy_model.{k}", model[k]) for k in ("d_model", "n_layers", "n_heads", "head_dim", "vocab_size")
               if k in model], ("tokenizer", obj.get("tokenizer"))]
    if any(v is not None for _, v in shape):
        blocks.append(kv_table(shape))
    laws = obj.get("laws") or {}
    if isinstance(laws, dict) and laws:
        blocks.append(Table(["fitted law", "value"], [[k, fmt(v, 6)] for k, v in flatten(laws)]))
    prov = obj.get("provenance") or {}
    if prov:
        blocks.append(Table(["provenance", "value"], [[k, fmt(v, 6)] for k, v in flatten(prov)]))
    return blocks


def training_lock_blocks(run: Run) -> list:
    """The lock a training run recorded in its config.json: which frozen values it trained with."""
    config = load_json_quiet(run.path / "config.json")
    if not isinstance(config, dict) or not config.get("hparams_lock"):
        return []
    lock = config["hparams_lock"]
    blocks: list = [Heading(f"{run.label} (used by this training run)"),
                    Para(f"lock file {lock.get('path', '?')}, content hash {lock.get('content_hash', '?')}")]
    blocks += hparams_blocks({"hparams": config.get("hparams") or {}, "provenance": lock.get("provenance") or {}})
    return blocks
