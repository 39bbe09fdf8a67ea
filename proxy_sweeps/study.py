"""The study: its sampler and pruner, and opening (or creating) it with its definition checked.

Sampler seeds differ per worker *and* per invocation of ``mutransfer sweep``: a seed that is the
same on every run makes a resumed sweep re-draw the points it already tried (the random sampler,
and every sampler's random startup trials). The seed of a worker is a hash of the sweep's
``sampler.seed``, the invocation number (counted in the study), the host and the worker index;
each trial records the seed of the worker that sampled it, so a sweep stays reproducible from
its storage.
"""

from __future__ import annotations

import datetime
import json
import socket
import zlib

import optuna

from mutransfer.config import ConfigError
from proxy_sweeps import storage as st
from proxy_sweeps.spec import SweepSpec

INVOCATIONS_ATTR = "invocations"
DATA_ATTR = "data_fingerprint"


def sampler_seed(spec: SweepSpec, invocation: int, worker_index: int, host: str | None = None) -> int:
    """Distinct per (sweep seed, invocation, host, worker); a 31-bit integer."""
    host = host if host is not None else socket.gethostname()
    return zlib.crc32(f"{spec.sampler.seed}:{invocation}:{host}:{worker_index}".encode()) & 0x7FFFFFFF


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                          multivariate=s.multivariate, constant_liar=True)
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    return _GridSampler({p.name: list(p.choices) for p in spec.search}, seed=seed)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler that does not call study.stop() (our loop, not optimize(), ends the sweep)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource or spec.train.eval_every,
                                              max_resource=spec.max_step, reduction_factor=p.reduction_factor)
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def distributions(spec: SweepSpec) -> dict:
    """The search space as Optuna distributions (trials are asked with all of them sampled up front,
    so a duplicate of a finished trial can be seen before it trains)."""
    out = {}
    for p in spec.search:
        if p.choices is not None:
            choices = [int(c) for c in p.choices] if p.is_int else list(p.choices)
            out[p.name] = optuna.distributions.CategoricalDistribution(choices)
        elif p.is_int:
            out[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), step=int(p.step or 1))
        else:
            out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def create_or_check(spec: SweepSpec, url: str, name: str, storage, data_fingerprint: str,
                    allow_data_change: bool = False) -> optuna.Study:
    """Create the study, or reopen it refusing another definition or other data (unless allowed)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    attrs = study.user_attrs
    if attrs.get("definition_hash") is None:
        study.set_user_attr("definition_hash", spec.definition_hash())
        study.set_user_attr("spec", json.loads(json.dumps(spec.raw, default=str)))
        study.set_user_attr(DATA_ATTR, data_fingerprint)
        return study
    if attrs["definition_hash"] != spec.definition_hash():
        raise ConfigError(f"--study {name!r}: the study in {st.redact(url)} was created from a different "
                          "sweep definition; pass another --study name or --out directory")
    recorded = attrs.get(DATA_ATTR)
    if recorded is not None and recorded != data_fingerprint:
        if not allow_data_change:
            raise ConfigError(f"--study {name!r}: its trials were run on data with fingerprint {recorded[:16]}..., "
                              f"but data.spec = {spec.data.spec!r} now has {data_fingerprint[:16]}...; the trials "
                              "would not be comparable. Use another --out/--study, or pass --allow-data-change "
                              "(recorded in the study)")
        changes = attrs.get("data_changes", [])
        study.set_user_attr("data_changes", [*changes, {"from": recorded, "to": data_fingerprint,
                                                        "time": _now()}])
        study.set_user_attr(DATA_ATTR, data_fingerprint)
    return study


def record_invocation(study: optuna.Study, workers: int) -> int:
    """Count this ``mutransfer sweep`` run in the study (call under the budget lock); its number."""
    runs = list(study.user_attrs.get(INVOCATIONS_ATTR, []))
    runs.append({"time": _now(), "host": socket.gethostname(), "workers": workers})
    study.set_user_attr(INVOCATIONS_ATTR, runs)
    return len(runs) - 1


def load_for_worker(spec: SweepSpec, name: str, storage, seed: int) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec, seed),
                             pruner=make_pruner(spec))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
