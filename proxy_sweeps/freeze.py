"""``mutransfer freeze DIR``: the best trial's base hyperparameters as a lock file, with provenance.

Sampled values are base values by construction (the muP table scales them at other widths), so
the lock stores them as they are. Schedule values a sweep searched (warmup) belong to the proxy's
budget, not to the full-scale run; they go into provenance only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mutransfer.config import ConfigError
from mutransfer.lockfile import write_lock
from proxy_sweeps import storage as st
from proxy_sweeps.engine import CONFIG_FILE, STORAGE_ENV, trial_settings
from proxy_sweeps.export import best_trial
from proxy_sweeps.provenance import code_version
from proxy_sweeps.spec import HPARAM_FIELDS, spec_from_mapping


def read_config(out_dir) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{out_dir}: no {CONFIG_FILE}; is this a directory written by `mutransfer sweep`?")
    return json.loads(path.read_text())


def load_sweep_study(out_dir, storage: str | None = None):
    """The spec, config, storage URL and study of a sweep directory."""
    cfg = read_config(out_dir)
    url = storage or os.environ.get(STORAGE_ENV) or cfg["storage"]
    if "***" in url:
        raise ConfigError(f"{out_dir}/{CONFIG_FILE}: the storage URL's password was not saved; pass --storage URL")
    spec = spec_from_mapping(cfg["spec"])
    store = st.open_storage(st.normalize(url, out_dir), spec.sweep.heartbeat_interval, spec.sweep.grace_period)
    try:
        study = optuna.load_study(study_name=cfg["study"], storage=store)
    except KeyError as e:
        raise ConfigError(f"study {cfg['study']!r} not found in {st.redact(url)}") from e
    return spec, cfg, url, study


def freeze(out_dir, lock_path, storage: str | None = None) -> dict:
    spec, cfg, url, study = load_sweep_study(out_dir, storage)
    best = best_trial(study)
    if best is None:
        raise ConfigError(f"study {cfg['study']!r} has no complete trial to freeze")
    hp, tc = trial_settings(spec, best.params, spec.train.device)
    seeds = [float(v) for v in best.user_attrs.get("seed_values", [])]
    trials = study.get_trials(deepcopy=False)
    provenance = {
        "study": cfg["study"],
        "storage": st.redact(url),
        "trial_number": best.number,
        "objective": {
            "metric": "held-out loss",
            "value": best.value,
            "seed_values": seeds,
            "seed_std": statistics.stdev(seeds) if len(seeds) > 1 else 0.0,
            "seeds": spec.objective.seeds,
            "last_evals": spec.objective.last_evals,
        },
        "proxy": {
            "preset": spec.preset,
            "width": spec.shape.model.d_model,
            "depth": spec.shape.model.n_layers,
            "parametrization": spec.shape.param.parametrization,
        },
        "tokenizer": spec.shape.model.tokenizer,
        "data": {"spec": spec.data.spec, "fingerprint": cfg.get("data_fingerprint")},
        "searched": sorted(best.params),
        "schedule_params": {k: v for k, v in best.params.items() if k not in HPARAM_FIELDS},
        "proxy_train": dataclasses.asdict(tc),
        "sweep": {
            "definition_hash": spec.definition_hash(),
            "trials_budget": cfg["trials"],
            "trials_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "trials_total": len(trials),
            "sampler": spec.sampler.kind,
            "pruner": spec.pruner.kind,
        },
        "code": code_version(),
        "frozen_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return write_lock(lock_path, hp, spec.shape.param, spec.shape.model, provenance)
