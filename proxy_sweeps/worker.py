"""A sweep worker process: ``python -m proxy_sweeps.worker DIR --index I``.

Started by ``mutransfer sweep`` (one per --workers), or by hand on another machine sharing the
storage. It reads DIR/config.json and pulls trials until the study's budget is spent: under the
budget lock it fails trials whose heartbeat stopped (queuing their retries), then asks for the
next trial -- a queued retry first, else a new point (re-asked while it duplicates an earlier
trial's parameters) -- or waits while others run, or ends. SIGTERM/SIGINT: the running trial is
marked interrupted and its retry queued (up to ``max_retries``), then the worker exits 130; a stop
that arrives while a trial is being handed out waits until the worker holds it, so no trial is
left RUNNING with nobody to finish it. When the sweep's main process dies, the worker stops the
same way (it checks its parent).

Each trial is one run in the trackers of ``[tracking]`` (``trial-NNNN``, grouped by the study's
name, the trial's parameters as its config); its outcome is an ``outcome`` event at its last step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mutransfer.config import ConfigError
from mutransfer.rundir import read_json
from mutransfer.tracking import Tracking
from proxy_sweeps import storage as st
from proxy_sweeps.budget import (
    DUPLICATE_ATTR,
    MAX_DUPLICATE_ASKS,
    OUTCOME_ATTR,
    account,
    duplicate_of,
    is_retry,
    requeue_missing_retries,
)
from proxy_sweeps.optuna_adapter import trial_id
from proxy_sweeps.processes import StopSignals, watch_parent
from proxy_sweeps.spec import spec_from_mapping
from proxy_sweeps.study import distributions, load_for_worker, sampler_seed
from proxy_sweeps.trial import Heartbeat, run_trial, trial_settings

CONFIG_FILE = "config.json"
# We drive ask/tell ourselves (the budget lock needs it) and run the heartbeat thread ourselves.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
STORAGE_ENV = "MUTRANSFER_SWEEP_STORAGE"  # the full storage URL (with password) for workers


def next_trial(study: optuna.Study, storage, url: str, name: str, n_trials: int, max_retries: int, space: dict):
    """Under the budget lock: a trial to run, "wait" while others run, or None when done."""
    with st.budget_lock(url, storage, name):
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        acc = account(trials, max_retries)
        if acc.to_retry:
            requeue_missing_retries(study, acc, storage.get_heartbeat_stale_trial_callback())
            trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and acc.used >= n_trials:
            return "wait" if any(t.state == TrialState.RUNNING for t in trials) else None
        for _ in range(MAX_DUPLICATE_ASKS):
            trial = study.ask(space)
            storage.record_heartbeat(trial_id(trial))
            frozen = storage.get_trial(trial_id(trial))
            twin = None if (waiting or is_retry(frozen)) else duplicate_of(trial.params, trials, trial.number)
            if twin is None:
                return trial
            trial.set_user_attr(DUPLICATE_ATTR, twin)
            trial.set_user_attr("reason", f"duplicate of trial {twin}'s parameters; asked again")
            study.tell(trial, state=TrialState.FAIL)
        return trial  # the space is exhausted of new points: run the last one rather than spin


def trial_config(spec, study: str, trial: optuna.Trial, device: str) -> dict:
    """A trial's tracker config: its searched parameters at the top, then everything it trains with."""
    config = {**trial.params, "study": study, "trial": trial.number, "model": spec.shape.model.model_dump(),
              "param": spec.shape.param.model_dump()}
    try:
        hp, train = trial_settings(spec, trial.params, device)
    except ConfigError:  # the trial fails with this error when it runs (run_trial stores it)
        return config
    return {**config, "hparams": hp.model_dump(), "train": train.model_dump()}


def interrupted(study: optuna.Study, storage, url: str, name: str, trial: optuna.Trial, max_retries: int) -> None:
    """Mark the running trial interrupted and queue its retry, under the budget lock."""
    with st.budget_lock(url, storage, name), contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        retries = len(storage.get_trial(trial_id(trial)).system_attrs.get("retry_history", []))
        left = max_retries - retries
        trial.set_user_attr(OUTCOME_ATTR, "interrupted")
        trial.set_user_attr("reason", "interrupted (SIGINT/SIGTERM); " + (
            f"retry {retries + 1} of {max_retries} queued for the next run" if left > 0 else
            f"retries exhausted ({max_retries}): the trial is lost"))
        frozen = study.tell(trial, state=TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, frozen)


def work(out_dir: str | Path, index: int, threads: int | None = None, storage_url: str | None = None) -> int:
    """One worker process: pull trials until the budget is spent."""
    import torch

    from mutransfer.data.builtin import open_dataset

    stops = StopSignals()
    stops.install()
    if os.environ.get("MUTRANSFER_SWEEP_PARENT"):
        watch_parent(int(os.environ["MUTRANSFER_SWEEP_PARENT"]))
    cfg = read_json(Path(out_dir) / CONFIG_FILE, "sweep config")
    spec = spec_from_mapping(cfg["spec"])
    url = storage_url or os.environ.get(STORAGE_ENV) or cfg["storage"]
    if threads:
        torch.set_num_threads(threads)
    device = cfg.get("device") or "cpu"
    hb, grace, max_retries = spec.sweep.heartbeat_interval, spec.sweep.grace_period, spec.sweep.max_retries
    storage = st.open_storage(url, hb, grace, max_retries)
    seed = sampler_seed(spec, cfg.get("invocation", 0), index)
    study = load_for_worker(spec, cfg["study"], storage, seed)
    dataset = open_dataset(spec.data.spec, spec.shape.model.tokenizer, vocab_size=spec.shape.model.vocab_size)
    space = distributions(spec)
    tag = f"{os.uname().nodename}:{os.getpid()}"
    while True:
        trial = None
        try:  # a stop marks the trial this worker holds interrupted: nothing leaves it RUNNING
            with stops.held():
                trial = next_trial(study, storage, url, cfg["study"], cfg["trials"], max_retries, space)
            if trial is None:
                return 0
            if trial == "wait":
                time.sleep(min(hb, 2.0))
                continue
            trial.set_user_attr("worker", tag)
            trial.set_user_attr("sampler_seed", seed)
            trial.set_user_attr("retry_of", storage.get_trial(trial_id(trial)).system_attrs.get("failed_trial"))
            with Heartbeat(storage, trial_id(trial), hb), Tracking(spec.tracking, out_dir) as tracking:
                tracking.start(f"trial-{trial.number:04d}", cfg["study"],
                               trial_config(spec, cfg["study"], trial, device))
                state, value = run_trial(trial, spec, dataset, device, tracking)
                if value is not None:
                    tracking.log({"objective": value}, tracking.last_step)
                tracking.event("outcome", {"state": state.name, "value": value, **{
                    k: trial.user_attrs.get(k) for k in (OUTCOME_ATTR, "reason", "seconds", "tokens")}})
                tracking.finish(failed=state == TrialState.FAIL)
            frozen = study.tell(trial, value, state=state) if value is not None else study.tell(trial, state=state)
        except KeyboardInterrupt:  # stopped: record the trial held (if any) and queue its retry
            if isinstance(trial, optuna.Trial):
                with stops.held():  # a second stop must not cut the record short
                    interrupted(study, storage, url, cfg["study"], trial, max_retries)
            return 130
        except optuna.exceptions.UpdateFinishedTrialError:
            # Our heartbeat lapsed (a stall longer than the grace period): another worker failed
            # this trial and queued its retry, so this result is dropped, not recorded twice.
            print(f"trial {trial.number}: already failed by heartbeat elsewhere; result dropped", file=sys.stderr)
            continue
        print(f"trial {frozen.number}: {frozen.state.name} value={value} reason={frozen.user_attrs.get('reason')}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy_sweeps.worker")
    parser.add_argument("out", help="the sweep directory (holds config.json)")
    parser.add_argument("--index", type=int, default=0, help="worker number on this machine (seeds the sampler)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--storage", help="storage URL (default: $MUTRANSFER_SWEEP_STORAGE, then config.json)")
    args = parser.parse_args(argv)
    try:
        return work(args.out, args.index, args.threads, args.storage)
    except KeyboardInterrupt:  # stopped before or between trials
        return 130


if __name__ == "__main__":
    sys.exit(main())
