"""``mutransfer freeze DIR``: the best trial's base hyperparameters as a lock file, with provenance.

Sampled values are base values by construction (the muP table scales them at other widths), so
the lock stores them as they are. Schedule values a sweep searched (warmup) belong to the proxy's
budget, not to the full-scale run; they go into provenance only.
"""

from __future__ import annotations

import datetime
import os
import statistics
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mutransfer.config import ConfigError, HParams, apply_overrides, parse
from mutransfer.lockfile import write_lock
from mutransfer.rundir import code_version, read_json
from proxy_sweeps import storage as st
from proxy_sweeps.export import best_trial
from proxy_sweeps.spec import HPARAM_FIELDS, spec_from_mapping
from proxy_sweeps.trial import trial_settings
from proxy_sweeps.worker import CONFIG_FILE, STORAGE_ENV


def read_config(out_dir) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{out_dir}: no {CONFIG_FILE}; is this a directory written by `mutransfer sweep`?")
    cfg = read_json(path, "sweep config")
    if not isinstance(cfg, dict) or "spec" not in cfg or "study" not in cfg:
        raise ConfigError(f"{path}: not a sweep config (no spec/study); is this a `mutransfer sweep` directory?")
    return cfg


def load_sweep_study(out_dir, storage: str | None = None):
    """The spec, config, storage URL and study of a sweep directory."""
    cfg = read_config(out_dir)
    url = storage or os.environ.get(STORAGE_ENV) or cfg["storage"]
    if "***" in url:
        raise ConfigError(f"{out_dir}/{CONFIG_FILE}: the storage URL's password was not saved; pass --storage URL")
    spec = spec_from_mapping(cfg["spec"])
    store = st.open_storage(st.normalize(url, out_dir), spec.sweep.heartbeat_interval, spec.sweep.grace_period,
                            spec.sweep.max_retries)
    try:
        study = optuna.load_study(study_name=cfg["study"], storage=store)
    except KeyError as e:
        raise ConfigError(f"study {cfg['study']!r} not found in {st.redact(url)}") from e
    return spec, cfg, url, study


def read_laws(dirs) -> dict:
    """{kind: law} from transfer-check directories along steps (horizon) or batch_size (batch)."""
    from mutransfer.laws import law_from_verdict

    laws = {}
    for d in dirs or ():
        verdict = read_json(Path(d) / "verdict.json", "transfer-check verdict")
        config = read_json(Path(d) / "config.json", "transfer-check config")
        law = law_from_verdict(verdict, config, str(d))
        if law["kind"] in laws:
            raise ConfigError(f"--law {d}: a {law['kind']} law is already attached "
                              f"(from {laws[law['kind']]['source']})")
        laws[law["kind"]] = law
    return laws


def freeze(out_dir, lock_path, storage: str | None = None, overrides=(), law_dirs=()) -> dict:
    spec, cfg, url, study = load_sweep_study(out_dir, storage)
    best = best_trial(study)
    if best is None:
        raise ConfigError(f"study {cfg['study']!r} has no complete trial to freeze")
    hp, tc = trial_settings(spec, best.params)
    if overrides:
        raw = apply_overrides({"hparams": hp.model_dump()}, overrides, ("hparams",))
        hp = parse(HParams, raw["hparams"], "--set hparams")
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
        "proxy_train": tc.model_dump(),
        "sweep": {
            "definition_hash": spec.definition_hash(),
            "trials_budget": cfg["trials"],
            "trials_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "trials_total": len(trials),
            "sampler": spec.sampler.kind,
            "pruner": spec.pruner.kind,
        },
        "set_by_hand": list(overrides),
        "code": code_version(),
        "frozen_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    laws = read_laws(law_dirs)
    return write_lock(lock_path, hp, spec.shape.param, spec.shape.model, provenance, laws=laws)
