"""One sweep trial: its base hyperparameters and budget, the proxy runs it trains, its heartbeat.

A trial trains the proxy ``seeds`` times (the same seeds for every trial: common random numbers
make trials comparable), reports held-out losses to the pruner, and scores the mean over seeds of
the mean of the last ``last_evals`` held-out losses. Outcomes (``budget.OUTCOME_ATTR``): complete;
pruned by the pruner, or for divergence (NaN/inf/exploding loss), reason stored; error (an
exception, message and traceback stored).

With a tracker (``mutransfer.tracking``) the trial's curves go to it as well: ``loss`` at every
step, ``val_loss`` at every held-out evaluation; seeds run one after another, so seed i's step s
is step ``i * steps + s`` (the step the pruner sees).
"""

from __future__ import annotations

import math
import statistics
import sys
import threading
import time
import traceback

import optuna
from optuna.trial import TrialState

from mutransfer.config import HParams, ProxyTrain, updated
from mutransfer.tracking import Tracking
from mutransfer.training import Diverged, train_proxy
from proxy_sweeps.budget import OUTCOME_ATTR
from proxy_sweeps.spec import HPARAM_FIELDS, SweepSpec


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict:
    """The trial's parameters (already sampled when the trial was asked with the distributions)."""
    params = {}
    for p in spec.search:
        if p.choices is not None:
            choices = [int(c) for c in p.choices] if p.is_int else list(p.choices)
            params[p.name] = trial.suggest_categorical(p.name, choices)
        elif p.is_int:
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1))
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
    return params


def trial_settings(spec: SweepSpec, params: dict, device: str | None = None) -> tuple[HParams, ProxyTrain]:
    """Base hyperparameters and training budget of a trial with ``params``."""
    hp = updated(spec.hparams, "trial", **{k: float(v) for k, v in params.items() if k in HPARAM_FIELDS})
    train_values = {k: int(v) for k, v in params.items() if k not in HPARAM_FIELDS}
    if device is not None:
        train_values["device"] = device
    return hp, updated(spec.train, "trial", **train_values)


def run_trial(trial: optuna.Trial, spec: SweepSpec, dataset, device: str, tracking: Tracking | None = None
              ) -> tuple[TrialState, float | None]:
    """Train the proxy ``seeds`` times; returns the trial's state and value. Never raises an Exception.
    ``tracking``: a started tracker run that gets the curves."""
    tracking = tracking or Tracking(None, ".")
    start = time.perf_counter()
    tokens = 0
    seed_values: list[float] = []
    seed_batches: list[list[float]] = []
    state, value, reason, outcome = TrialState.COMPLETE, None, None, "complete"
    try:
        params = suggest(trial, spec)
        hp, train = trial_settings(spec, params, device)
        for i in range(spec.objective.seeds):
            tc = updated(train, "trial", seed=train.seed + i, data_seed=train.data_seed + i)
            offset = i * train.steps

            def on_eval(step: int, val: float, offset=offset) -> None:
                tracking.log({"val_loss": val}, offset + step - 1)  # measured after update ``step - 1``
                trial.report(val, offset + step)
                # Never prune at the last report: the run is done, its result is worth keeping.
                if offset + step < spec.max_step and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned by {spec.pruner.kind} at step {offset + step} "
                                             f"(held-out loss {val:.4f})")

            def on_step(step: int, loss: float, tc=tc, offset=offset) -> None:
                nonlocal tokens
                tokens += tc.tokens_per_step
                tracking.log({"loss": loss, "tokens": tokens}, offset + step)

            result = train_proxy(spec.shape, hp, tc, dataset, on_eval=on_eval, on_step=on_step)
            seed_values.append(result.final_val(spec.objective.last_evals))
            seed_batches.append(result.final_val_batches(spec.objective.last_evals))
        value = statistics.fmean(seed_values)
        if not math.isfinite(value):
            state, reason, outcome = TrialState.PRUNED, f"diverged: objective is {value}", "diverged"
    except Diverged as e:
        state, reason, outcome = TrialState.PRUNED, f"diverged: {e.reason}", "diverged"
    except optuna.TrialPruned as e:
        state, reason, outcome = TrialState.PRUNED, str(e) or "pruned", "pruned"
    except Exception as e:  # noqa: BLE001 -- any error is the trial's outcome, stored, not the worker's end
        state, reason, outcome = TrialState.FAIL, f"{type(e).__name__}: {e}", "error"
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
    trial.set_user_attr("reason", reason)
    trial.set_user_attr(OUTCOME_ATTR, outcome)
    trial.set_user_attr("seed_values", seed_values)
    trial.set_user_attr("seed_val_batches", seed_batches)
    trial.set_user_attr("tokens", tokens)
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
    if state != TrialState.COMPLETE:
        value = None
    return state, value


class Heartbeat:
    """Records the trial's heartbeat every interval from a thread while the trial trains."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001 -- a missed beat is retried next interval
                print(f"heartbeat failed: {e}", file=sys.stderr)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
