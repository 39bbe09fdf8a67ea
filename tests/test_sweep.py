"""The sweep engine end to end: real Optuna, real training of the tiny model on tiny budgets."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mutransfer.cli import main
from mutransfer.config import ConfigError
from mutransfer.lockfile import read_lock
from proxy_sweeps import storage as st
from proxy_sweeps.spec import load_spec
from proxy_sweeps.sweep import prepare
from proxy_sweeps.trial import run_trial
from tests.sweep_files import TINY_TRIAL

ROOT = Path(__file__).resolve().parent.parent

SMALL = """
[sweep]
name = "small"
trials = 4
heartbeat_interval = 1
grace_period = {grace}

{trial}
[objective]
last_evals = 1
seeds = 2

[sampler]
kind = "tpe"
n_startup_trials = 2

[search.lr]
{lr}

[search.init_std]
low = 0.05
high = 0.2
log = true

[search.warmup]
low = 0
high = 4
step = 2
"""
LR_RANGE = "low = 1e-3\nhigh = 3e-2\nlog = true"


def sweep_file(tmp_path: Path, name: str = "small.toml", steps: int = 12, grace: int = 60, lr: str = LR_RANGE,
               extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(SMALL.format(trial=TINY_TRIAL.format(steps=steps), grace=grace, lr=lr) + extra)
    return path


def study_of(out: Path, name: str = "small") -> optuna.Study:
    storage = st.open_storage(st.default_storage(out))
    return optuna.load_study(study_name=name, storage=storage)


def sweep(*args: str) -> int:
    # One thread per worker: a tiny model gains nothing from more, and shared CPUs lose a lot.
    return main(["sweep", *args, "--quiet", "--threads", "1"])


def test_shipped_sweep_files_parse():
    for name in ("quickstart.toml", "xmodel25_proxy.toml"):
        spec = load_spec(ROOT / "proxy_sweeps" / name)
        assert {p.name for p in spec.search} >= {"lr", "init_std", "alpha_in", "alpha_out", "alpha_res",
                                                   "warmup", "weight_decay"}


@pytest.mark.parametrize("edit, field", [
    (("[search.lr]\n" + LR_RANGE, "[search.lr]\nlow = 0.1\nhigh = 0.01"), "search.lr"),
    (('kind = "tpe"', 'kind = "bayes"'), "sampler.kind"),
    (("[search.init_std]", "[search.dropout]"), "search.dropout"),
    (("steps = 12", "steps = -5"), "train.steps"),
    (('preset = "tiny"', 'preset = "tiny"\nwidth = 70'), "width"),
    (('spec = "builtin"', 'spec = "/nonexistent/prepared"'), "data"),
    (("last_evals = 1", "last_evals = 9"), "objective.last_evals"),
    (("[search.warmup]\nlow = 0\nhigh = 4", "[search.warmup]\nlow = 0\nhigh = 40"), "search.warmup"),
    (("steps = 12", "steps = nan"), "train.steps"),
    (("low = 0.05", "low = nan"), "search.init_std.low: input should be a finite number"),
    (("heartbeat_interval = 1", "heartbeat_interval = 1\nmax_retries = -1"), "sweep.max_retries"),
])
def test_bad_sweep_file_fails_before_compute_naming_the_field(tmp_path, capsys, edit, field):
    path = sweep_file(tmp_path)
    old, new = edit
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    out = tmp_path / "out"
    assert sweep(str(path), "--out", str(out)) == 2
    assert field in capsys.readouterr().err
    assert not (out / "optuna-journal.log").exists() and not (out / "trials.parquet").exists()
    with pytest.raises(ConfigError, match=field):
        prepare(path, tmp_path / "out2")


@pytest.mark.slow
def test_sweep_two_workers_then_freeze(tmp_path):
    out = tmp_path / "out"
    assert sweep(str(sweep_file(tmp_path)), "--workers", "2", "--out", str(out)) == 0
    df = pd.read_parquet(out / "trials.parquet")
    assert sorted(df["number"]) == [0, 1, 2, 3]
    assert set(df["state"]) <= {"COMPLETE", "PRUNED"}
    complete = df[df["state"] == "COMPLETE"]
    assert len(complete) >= 1 and all(len(v) == 2 for v in complete["seed_values"])
    assert (complete["tokens"] == 2 * 12 * 4 * 32).all()
    assert {"params_lr", "params_init_std", "params_warmup", "reason", "duration_s"} <= set(df.columns)
    for f in ("config.json", "environment.json", "importances.json", "summary.json",
              "plots/optimization_history.png", "plots/params.png"):
        assert (out / f).is_file(), f
    assert {"fanova", "ped_anova"} <= set(json.loads((out / "importances.json").read_text()))

    lock_path = tmp_path / "hparams.lock.json"
    assert main(["freeze", str(out), "--out", str(lock_path)]) == 0
    lock = read_lock(lock_path)
    best = complete.loc[complete["value"].idxmin()]
    assert lock.hparams.lr == pytest.approx(best["params_lr"])
    assert lock.hparams.init_std == pytest.approx(best["params_init_std"])
    prov = lock.provenance
    assert prov["trial_number"] == best["number"] and prov["study"] == "small"
    assert prov["objective"]["value"] == pytest.approx(best["value"])
    seeds = prov["objective"]["seed_values"]
    assert len(seeds) == 2 and prov["objective"]["seed_std"] == pytest.approx(statistics.stdev(seeds))
    assert prov["proxy"] == {"preset": "tiny", "width": 64, "depth": 4, "parametrization": "mup"}
    assert prov["data"]["fingerprint"] and prov["tokenizer"] == "byte"
    assert prov["schedule_params"]["warmup"] == best["params_warmup"]
    assert prov["code"]["package"]


@pytest.mark.slow
def test_resume_continues_the_same_study(tmp_path):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    assert sweep(str(path), "--trials", "2", "--out", str(out)) == 0
    assert len(study_of(out).trials) == 2
    assert sweep(str(path), "--trials", "3", "--out", str(out)) == 0
    storage = st.open_storage(st.default_storage(out))
    assert optuna.study.get_all_study_names(storage) == ["small"]
    assert [t.number for t in study_of(out).trials] == [0, 1, 2]
    assert len(pd.read_parquet(out / "trials.parquet")) == 3
    # Same budget again: nothing left to do, nothing duplicated.
    assert sweep(str(path), "--trials", "3", "--out", str(out)) == 0
    assert len(study_of(out).trials) == 3
    # A changed definition is refused rather than mixed into the study.
    changed = sweep_file(tmp_path, steps=18)
    assert sweep(str(changed), "--out", str(out)) == 2


@pytest.mark.slow
def test_two_processes_sharing_a_journal_lose_and_duplicate_nothing(tmp_path):
    """Two `mutransfer sweep` commands (as two machines would) on one journal file: exactly N trials."""
    path, journal = sweep_file(tmp_path), tmp_path / "shared.journal"
    cmds = [[sys.executable, "-m", "mutransfer.cli", "sweep", str(path), "--storage", str(journal), "--trials", "6",
             "--out", str(tmp_path / f"out{i}"), "--quiet", "--threads", "1"] for i in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cmds]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read().decode()[-2000:]
    study = optuna.load_study(study_name="small", storage=st.open_storage(str(journal)))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    # Two invocations, counted in the study, so their workers' sampler seeds differ; no point twice.
    assert len(study.user_attrs["invocations"]) == 2
    assert all(t.user_attrs["sampler_seed"] is not None for t in study.trials)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params)


@pytest.mark.slow
def test_diverging_trial_is_pruned_with_its_reason(tmp_path):
    out = tmp_path / "out"
    path = sweep_file(tmp_path, lr="choices = [1000.0]")
    assert sweep(str(path), "--trials", "2", "--out", str(out)) == 1  # no complete trial to report
    df = pd.read_parquet(out / "trials.parquet")
    assert list(df["state"]) == ["PRUNED", "PRUNED"]
    assert all(r.startswith("diverged:") for r in df["reason"])


def test_exception_in_a_trial_is_stored_as_failure(tmp_path):
    class Broken:
        fingerprint = "broken"

        def check_tokenizer(self, spec):
            pass

        def batch(self, *args, **kwargs):
            raise OSError("disk went away")

        def eval_batches(self, *args, **kwargs):
            return []

    spec = load_spec(sweep_file(tmp_path))
    study = optuna.create_study()
    trial = study.ask()
    state, value = run_trial(trial, spec, Broken(), "cpu")
    assert state == TrialState.FAIL and value is None
    frozen = study.tell(trial, state=state)
    assert frozen.user_attrs["reason"] == "OSError: disk went away"
    assert "disk went away" in frozen.user_attrs["traceback"]


@pytest.mark.slow
def test_sigkilled_worker_is_failed_by_heartbeat_and_retried(tmp_path):
    out = tmp_path / "out"
    path = sweep_file(tmp_path, steps=60, grace=3)
    prepare(path, out, trials=2)
    worker = [sys.executable, "-m", "proxy_sweeps.worker", str(out), "--threads", "1"]
    victim = subprocess.Popen(worker + ["--index", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = study_of(out)
    deadline = time.time() + 120
    # Mid-trial: running, with every hyperparameter drawn (so it is training).
    while not any(t.state == TrialState.RUNNING and len(t.params) == 3 for t in study.get_trials(deepcopy=False)):
        assert time.time() < deadline and victim.poll() is None, "the worker never started a trial"
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    orphan = study.trials[0]
    assert orphan.state == TrialState.RUNNING

    rescuer = subprocess.run(worker + ["--index", "1"], capture_output=True, text=True, timeout=300)
    assert rescuer.returncode == 0, rescuer.stderr[-2000:]
    trials = study_of(out).trials
    orphan = trials[0]
    assert orphan.state == TrialState.FAIL
    assert "outcome" not in orphan.user_attrs  # died mid-trial: nothing recorded, the heartbeat says it
    from proxy_sweeps.export import trials_frame

    assert trials_frame(study_of(out)).loc[0, "reason"].startswith("worker lost")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.params == orphan.params and retry.user_attrs["retry_of"] == 0
    # Budget 2 plus the one retry; the study stays usable for more trials.
    assert len(trials) == 3 and sum(t.state == TrialState.FAIL for t in trials) == 1
