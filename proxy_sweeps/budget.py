"""The trial budget: logical trials, their retries, and what counts as done or lost.

A *logical trial* is a trial the sampler proposed (a root) together with its retries (Optuna's
``RetryHeartbeatStaleTrialCallback`` re-queues a trial whose worker died with the same parameters
and the system attribute ``failed_trial`` = the root's number). The budget ``trials`` counts
logical trials, so retries never push the study past it, and each logical trial ends in one
outcome: complete, pruned (by the pruner or for divergence), failed (an exception in the trial),
or lost (its worker died or was stopped more than ``max_retries`` times). A lost trial is never
silent: the sweep says so and exits non-zero.

A root whose parameters equal those of an earlier trial (the same point asked twice) is marked
``duplicate_of`` and re-asked; it is not a logical trial.

Everything that changes the trial list (ask, fail a stale trial, queue a retry) happens under the
budget lock (``storage.budget_lock``), so N workers on M machines agree on the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

RETRY_ATTR = "failed_trial"  # set by RetryHeartbeatStaleTrialCallback on a retry
DUPLICATE_ATTR = "duplicate_of"
OUTCOME_ATTR = "outcome"  # complete | pruned | diverged | error | interrupted (absent: the worker died)
MAX_DUPLICATE_ASKS = 20


def is_retry(t: FrozenTrial) -> bool:
    return RETRY_ATTR in t.system_attrs


def is_duplicate(t: FrozenTrial) -> bool:
    return t.user_attrs.get(DUPLICATE_ATTR) is not None


def root_of(t: FrozenTrial) -> int:
    return t.system_attrs.get(RETRY_ATTR, t.number)


def needs_retry(t: FrozenTrial) -> bool:
    """A failed attempt that was not the trial's own error: its worker died or was stopped."""
    return t.state == TrialState.FAIL and t.user_attrs.get(OUTCOME_ATTR) in (None, "interrupted") \
        and not is_duplicate(t)


@dataclass
class Account:
    """Where the budget stands."""

    used: int = 0  # logical trials started
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # the trial raised: an outcome
    lost: list[int] = field(default_factory=list)  # roots whose retries are exhausted
    pending: int = 0  # logical trials still running or queued
    retries: int = 0  # attempts beyond the first
    duplicates: int = 0
    to_retry: list[FrozenTrial] = field(default_factory=list)  # last attempts that died with retries left

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed + len(self.lost)


def account(trials: list[FrozenTrial], max_retries: int) -> Account:
    acc = Account()
    chains: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        if is_duplicate(t):
            acc.duplicates += 1
            continue
        chains.setdefault(root_of(t), []).append(t)
    acc.used = len(chains)
    for attempts in chains.values():
        attempts.sort(key=lambda t: t.number)
        acc.retries += len(attempts) - 1
        last = attempts[-1]
        if last.state in (TrialState.RUNNING, TrialState.WAITING):
            acc.pending += 1
        elif last.state == TrialState.COMPLETE:
            acc.complete += 1
        elif last.state == TrialState.PRUNED:
            acc.pruned += 1
        elif not needs_retry(last):
            acc.failed += 1
        elif len(attempts) - 1 < max_retries:
            acc.pending += 1
            acc.to_retry.append(last)
        else:
            acc.lost.append(attempts[0].number)
    return acc


def requeue_missing_retries(study: optuna.Study, acc: Account, retry) -> None:
    """Queue the retry of an attempt that died without one queued (its failer died first)."""
    for t in acc.to_retry:
        retry(study, t)


def duplicate_of(params: dict, trials: list[FrozenTrial], number: int) -> int | None:
    """The number of an earlier (finished or running) root trial with exactly these parameters."""
    for t in trials:
        if t.number == number or is_duplicate(t) or is_retry(t) or t.state == TrialState.WAITING:
            continue
        if params == t.params:
            return t.number
    return None
