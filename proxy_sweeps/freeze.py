"""``mutransfer freeze DIR``: the best trial's base hyperparameters as a lock file, with provenance.

Sampled values are base values by construction (the muP table scales them at other widths), so
the lock stores them as they are. Schedule values a sweep searched (warmup) belong to the proxy's
budget, not to the full-scale run; they go into provenance only.

What freeze cannot vouch for it says, on stderr and in the lock's ``warnings``: a best value at
the edge of its search range (the optimum may lie outside it), a law whose transfer check did not
pass. ``strict`` refuses to write such a lock.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mutransfer.config import ConfigError, HParams, apply_overrides, parse
from mutransfer.lockfile import write_lock
from mutransfer.rundir import code_version, read_json
from proxy_sweeps import storage as st
from proxy_sweeps.export import best_trial
from proxy_sweeps.spec import HPARAM_FIELDS, NamedSearchParam, SweepSpec, spec_from_mapping
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


def recorded_storage(out_dir, cfg: dict) -> str:
    """The storage a sweep directory's config names, or the journal inside the directory itself when
    the recorded one lies elsewhere under the same file name: a directory copied from a cluster
    records the cluster's absolute journal path, and the journal that travelled with it is the one
    the user means (said on stderr)."""
    url = cfg["storage"]
    recorded = st.journal_path(url)
    if recorded is None:
        return url
    local = Path(out_dir) / Path(recorded).name
    if local.is_file() and local.resolve() != Path(recorded).resolve():
        print(f"note: {out_dir}: using the journal in the directory, {local}, not the recorded {recorded} "
              "(a moved or copied sweep directory); --storage picks another", file=sys.stderr)
        return st.normalize(str(local), out_dir)
    return url


def load_sweep_study(out_dir, storage: str | None = None):
    """The spec, config, storage URL and study of a sweep directory."""
    cfg = read_config(out_dir)
    url = storage or os.environ.get(STORAGE_ENV) or recorded_storage(out_dir, cfg)
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


# A best value within this fraction of its range's width from either end counts as "at the edge"
# (log-width for log = true ranges, the scale the sampler draws on; linear otherwise). The sampler
# concentrates its trials where the objective is lowest, so a best this close to a bound means the
# objective was still falling toward it: the optimum may lie outside the range, and the frozen value
# is then the bound, not the optimum. 5 % of a 100x LR range is a factor of 1.26 (a third of an
# octave), well inside the flat bottom of a typical LR basin, so a value inside the range that far
# from the bound is not mistaken for one pushing against it.
EDGE_FRACTION = 0.05


def range_edge(p: NamedSearchParam, value: float) -> str | None:
    """"low" or "high" when ``value`` sits at that edge of ``p``'s search range, else None.

    Choices: the smallest and the largest choice are the edges (nothing beyond them was tried).
    """
    if p.choices is not None:
        if len(p.choices) < 2:
            return None
        return "low" if value == min(p.choices) else "high" if value == max(p.choices) else None
    if p.log:
        position = math.log(value / p.low) / math.log(p.high / p.low)
    else:
        position = (value - p.low) / (p.high - p.low)
    return "low" if position <= EDGE_FRACTION else "high" if position >= 1 - EDGE_FRACTION else None


def edge_warnings(spec: SweepSpec, params: dict, set_by_hand: set[str]) -> list[dict]:
    """A warning for each searched value of the best trial at its range's edge (values set by hand excepted)."""
    warnings = []
    for p in sorted(spec.search, key=lambda p: p.name):
        if p.name not in params or p.name in set_by_hand:
            continue
        edge = range_edge(p, params[p.name])
        if edge is None:
            continue
        where = (f"choices {sorted(p.choices)}" if p.choices is not None else
                 f"[{p.low:g}, {p.high:g}]{' (log scale)' if p.log else ''}")
        warnings.append({"kind": "range_edge", "field": p.name, "message": (
            f"{p.name} = {params[p.name]:g} sits at the {edge} edge of its search range {where}: the optimum may "
            f"lie outside it; widen search.{p.name} and sweep again, or set it by hand (--set hparams.{p.name}=...)"
            if p.name in HPARAM_FIELDS else
            f"{p.name} = {params[p.name]:g} sits at the {edge} edge of its search range {where}: the optimum may "
            f"lie outside it; widen search.{p.name} and sweep again")})
    return warnings


def law_warnings(laws: dict) -> list[dict]:
    """A warning for each attached law whose transfer check's verdict is not "pass"."""
    warnings = []
    for kind, law in sorted(laws.items()):
        if law["outcome"] == "pass":
            continue
        error = law["held_out_error_octaves"]
        error = "none fitted" if error is None else f"{error:+.2f} octaves"
        warnings.append({"kind": "law_outcome", "field": f"laws.{kind}", "message": (
            f"the {kind} law's transfer check ({law['source']}) was {law['outcome']}: its prediction of the "
            f"held-out value (error {error}) is not established; [transfer] {kind} = 'fitted' would apply it anyway")})
    return warnings


class StrictRefusal(Exception):
    """``freeze --strict`` found warnings: no lock written."""

    def __init__(self, warnings: list[dict]):
        super().__init__("; ".join(w["message"] for w in warnings))
        self.warnings = warnings


def check_out(lock_path) -> Path:
    """``--out`` must be a file path in an existing, writable directory: checked before any work."""
    path = Path(lock_path)
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a directory; give the lock file's path, e.g. {path / 'hparams.lock.json'}")
    parent = path.parent
    existing = next((a for a in (parent, *parent.parents) if a.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"--out {path}: {existing} is not a directory")
    if existing != parent:
        raise ConfigError(f"--out {path}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: cannot write in {parent} (permission denied or read-only)")
    return path


def read_laws(dirs) -> dict:
    """{kind: law} from transfer-check directories along steps (horizon), batch_size (batch), or a Power
    Lines check of the weight decay over widths x steps (weight_decay)."""
    from mutransfer.laws import law_from_verdict
    from mutransfer.wd_law import wd_law_from_verdict

    laws = {}
    for d in dirs or ():
        verdict = read_json(Path(d) / "verdict.json", "transfer-check verdict")
        config = read_json(Path(d) / "config.json", "transfer-check config")
        if verdict.get("powerlines"):  # a Power Lines check (transfer.widths): the weight-decay law
            law = wd_law_from_verdict(verdict, str(d))
        else:
            law = law_from_verdict(verdict, config, str(d))
        if law["kind"] in laws:
            raise ConfigError(f"--law {d}: a {law['kind']} law is already attached "
                              f"(from {laws[law['kind']]['source']})")
        laws[law["kind"]] = law
    return laws


def freeze(out_dir, lock_path, storage: str | None = None, overrides=(), law_dirs=(), strict: bool = False) -> dict:
    """Write the lock of the sweep in ``out_dir``; returns it (its ``warnings`` included).

    ``strict``: a warning raises StrictRefusal and nothing is written.
    """
    check_out(lock_path)
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
    by_hand = {a.split("=", 1)[0].strip().removeprefix("hparams.") for a in overrides}
    warnings = edge_warnings(spec, best.params, by_hand) + law_warnings(laws)
    if strict and warnings:
        raise StrictRefusal(warnings)
    return write_lock(lock_path, hp, spec.shape.param, spec.shape.model, provenance, laws=laws, warnings=warnings)
