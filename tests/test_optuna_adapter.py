"""One test per private Optuna name the sweep uses (all of them in proxy_sweeps/optuna_adapter.py), so
an Optuna upgrade that moves or changes one fails here, loudly, instead of in a sweep."""

from __future__ import annotations

import multiprocessing
import time
import warnings

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from proxy_sweeps.optuna_adapter import FlockLock, HeartbeatJournalStorage, study_id, trial_id

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def test_study_and_trial_ids_are_the_storage_ids(tmp_path):
    storage = HeartbeatJournalStorage(str(tmp_path / "j.log"), 1, 2)
    study = optuna.create_study(storage=storage, study_name="s")
    assert storage.get_study_id_from_name("s") == study_id(study)
    trial = study.ask()
    assert storage.get_trial(trial_id(trial)).number == trial.number


def _hold(path: str, seconds: float) -> None:
    lock = FlockLock(path)
    lock.acquire()
    time.sleep(seconds)  # killed while holding it


def test_flock_lock_is_a_journal_lock_the_kernel_releases(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    path = str(tmp_path / "j.lock")
    backend = JournalFileBackend(str(tmp_path / "j.log"), lock_obj=FlockLock(path))  # accepted as BaseJournalFileLock
    assert backend is not None
    holder = multiprocessing.get_context("spawn").Process(target=_hold, args=(path, 60))
    holder.start()
    time.sleep(2.0)
    holder.kill()  # SIGKILL while holding: the kernel drops the lock
    holder.join()
    lock = FlockLock(path)
    start = time.monotonic()
    assert lock.acquire() and time.monotonic() - start < 5
    lock.release()


def test_the_heartbeat_hook_fails_a_silent_trial_through_optunas_public_function(tmp_path):
    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    storage = HeartbeatJournalStorage(str(tmp_path / "j.log"), heartbeat_interval=1, grace_period=1,
                                      callback=retry)
    study = optuna.create_study(storage=storage, study_name="s")
    alive, silent = study.ask(), study.ask()
    storage.record_heartbeat(trial_id(alive))
    time.sleep(1.5)
    storage.record_heartbeat(trial_id(alive))
    assert storage._get_stale_trial_ids(study_id(study)) == [trial_id(silent)]  # the private hook
    optuna.storages.fail_stale_trials(study)  # the public function that calls it
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[silent.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    retried = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == silent.number]
    assert len(retried) == 1 and retried[0].state == TrialState.WAITING


def test_the_heartbeat_storage_is_a_base_heartbeat():
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    assert issubclass(HeartbeatJournalStorage, BaseHeartbeat)
    assert is_heartbeat_enabled.__module__.startswith("optuna")
    with pytest.raises(TypeError):
        BaseHeartbeat()  # abstract: the methods our storage implements are still the required ones
