"""Fault injection for sweeps and transfer checks: the trial budget counts logical trials, a
resumed or extended sweep never repeats a point, SIGTERM stops workers and queues their trials,
and a sweep or transfer check refuses data that changed under it (the training faults:
test_faults.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mutransfer.cli import main
from mutransfer.rundir import read_jsonl
from tests.prepared_data import prepare_text
from tests.sweep_files import TINY_TRIAL

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- sweeps: budget, retries, signals


def frozen(number: int, state, retry_of: int | None = None, outcome: str | None = None, history=()):
    import optuna

    t = optuna.trial.create_trial(state=state, value=1.0 if state.name == "COMPLETE" else None,
                                  params={"lr": 0.01}, distributions={"lr": optuna.distributions.FloatDistribution(
                                      1e-3, 1e-1, log=True)},
                                  user_attrs={"outcome": outcome} if outcome else {},
                                  system_attrs={"failed_trial": retry_of, "retry_history": list(history)}
                                  if retry_of is not None else {})
    t.number = number
    return t


def test_budget_counts_logical_trials_and_names_the_lost():
    from optuna.trial import TrialState as S

    from proxy_sweeps.budget import account

    trials = [frozen(0, S.COMPLETE, outcome="complete"),
              frozen(1, S.FAIL),  # worker died: retried by 2, which was interrupted, retried by 3
              frozen(2, S.FAIL, retry_of=1, outcome="interrupted", history=[1]),
              frozen(3, S.COMPLETE, retry_of=1, outcome="complete", history=[1, 2]),
              frozen(4, S.FAIL, outcome="error"),  # the trial raised: an outcome, not retried
              frozen(5, S.FAIL, outcome="interrupted"),  # interrupted, retry 6 died too: with 1 retry, lost
              frozen(6, S.FAIL, retry_of=5, history=[5]),
              frozen(7, S.RUNNING)]
    acc = account(trials, max_retries=1)
    assert (acc.used, acc.complete, acc.failed, acc.lost, acc.pending, acc.retries) == (5, 2, 1, [5], 1, 3)
    assert acc.done == 4
    more = account(trials, max_retries=2)  # a larger limit: trial 5 is owed a retry, not lost
    assert more.lost == [] and [t.number for t in more.to_retry] == [6]


SWEEP = """
[sweep]
name = "faults"
trials = {trials}
heartbeat_interval = 1
grace_period = 3
max_retries = {retries}
""" + TINY_TRIAL + """
[objective]
last_evals = 1

[sampler]
kind = "random"

[pruner]
kind = "none"

[search.lr]
low = 1e-3
high = 3e-2
log = true
"""


def sweep_file(tmp_path: Path, trials: int = 3, retries: int = 2, steps: int = 6) -> Path:
    path = tmp_path / "faults.toml"
    path.write_text(SWEEP.format(trials=trials, retries=retries, steps=steps))
    return path


def study(out: Path):
    import optuna

    from proxy_sweeps import storage as st

    return optuna.load_study(study_name="faults", storage=st.open_storage(st.default_storage(out)))


@pytest.mark.slow
def test_resumed_and_extended_random_sweep_never_repeats_a_point(tmp_path):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    base = ["sweep", str(path), "--out", str(out), "--quiet", "--threads", "1"]
    assert main([*base, "--trials", "3"]) == 0
    assert main([*base, "--trials", "6", "--workers", "2"]) == 0
    trials = study(out).trials
    points = [t.params["lr"] for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(points) == 6 and len(set(points)) == 6
    seeds = {t.user_attrs["sampler_seed"] for t in trials}
    assert len(seeds) >= 2  # the second invocation's workers drew from other seeds
    assert len(study(out).user_attrs["invocations"]) == 2


def test_a_stop_while_a_trial_is_handed_out_waits_until_the_worker_holds_it():
    """Between Optuna's ask and the worker's try, a SIGTERM used to leave the trial RUNNING."""
    import os

    from proxy_sweeps.processes import StopSignals

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stops = StopSignals()
    try:
        stops.install()
        handed_out = []
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"), stops.held():
            os.kill(os.getpid(), signal.SIGTERM)
            handed_out.append("trial")  # still runs: the stop waits for the end of held()
        assert handed_out == ["trial"]
        with stops.held():
            pass  # the stop was delivered once, not kept for the next hand-out
        reached = []
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGINT)}"):
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after")  # outside held() the stop is immediate
        assert reached == []
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_workers_exports_and_queues_retries(tmp_path):

    from optuna.trial import TrialState

    path, out = sweep_file(tmp_path, trials=2, retries=1, steps=400), tmp_path / "out"
    cmd = [sys.executable, "-m", "mutransfer.cli", "sweep", str(path), "--out", str(out), "--quiet", "--threads", "1",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "config.json").exists() and sum(t.state == TrialState.RUNNING for t in study(out).trials) == 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    trials = study(out).trials
    assert sorted(t.state.name for t in trials) == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert all(t.user_attrs.get("outcome") == "interrupted" for t in trials if t.state == TrialState.FAIL)
    assert (out / "trials.parquet").is_file() and (out / "summary.json").is_file()
    workers = subprocess.run(["pgrep", "-f", f"proxy_sweeps.worker {out}"], capture_output=True, text=True)
    assert workers.stdout.strip() == ""  # no orphans
    # interrupted again: the retries are retried once more? No: max_retries = 1 is spent, so they are lost
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and sum(t.state == TrialState.RUNNING for t in study(out).trials) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 1 and "ended short" in final.stderr and "2 of 2 trials lost" in final.stderr


@pytest.mark.slow
def test_a_sweep_or_transfer_check_refuses_data_that_changed_under_it(tmp_path, capsys):
    data = tmp_path / "data"
    prepare_text(data, "".join(f"{i}. It was the best of times, it was the worst of times.\n\n" for i in range(300)))
    path = sweep_file(tmp_path, trials=1)
    path.write_text(path.read_text().replace('spec = "builtin"', f'spec = "{data}"'))
    out = tmp_path / "out"
    base = ["sweep", str(path), "--out", str(out), "--quiet", "--threads", "1"]
    assert main(base) == 0
    import shutil

    shutil.rmtree(data)
    prepare_text(data, "".join(f"{i}. Call me Ishmael. Some years ago, never mind how long.\n\n" for i in range(300)))
    assert main([*base, "--trials", "2"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main([*base, "--trials", "2", "--allow-data-change"]) == 0
    assert len(study(out).user_attrs["data_changes"]) == 1  # recorded in the study


@pytest.mark.slow
def test_more_seeds_extend_a_transfer_check_without_repeating_its_runs(tmp_path):
    check = tmp_path / "t.toml"
    check.write_text("[transfer]\naxis = 'width'\nvalues = [16, 32]\nparametrizations = ['mup']\nlr_log2_low = -8\n"
                     "lr_log2_high = -4\nlr_log2_step = 2\nseeds = 1\nmin_span = 2\n[model]\npreset = 'tiny'\n"
                     "[train]\nsteps = 6\nbatch_size = 4\nseq_len = 32\nwarmup = 0\neval_every = 6\neval_batches = 2\n"
                     "eval_batch_size = 4\n")
    out = tmp_path / "out"
    main(["transfer-check", str(check), "--out", str(out), "--quiet"])
    first = read_jsonl(out / "runs.jsonl")
    assert len(first) == 2 * 3 and {r["seed"] for r in first} == {0}
    assert json.loads((out / "verdict.json").read_text())["outcome"] == "inconclusive"  # one seed: no interval
    main(["transfer-check", str(check), "--out", str(out), "--quiet", "--seeds", "3"])
    runs = read_jsonl(out / "runs.jsonl")
    assert runs[:len(first)] == first and len(runs) == 3 * len(first)  # the first seed's runs were kept
    verdict = json.loads((out / "verdict.json").read_text())
    assert all(o["ci"] is not None for o in verdict["variants"]["mup"]["values"].values())


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from Linux's /proc")
def test_sigterm_to_a_transfer_check_stops_its_workers_and_a_rerun_finishes_without_repeats(tmp_path):
    """Its pool workers used to outlive a stopped check, training on and appending to runs.jsonl."""
    check = tmp_path / "t.toml"
    check.write_text("[transfer]\naxis = 'width'\nvalues = [16, 32]\nparametrizations = ['mup']\nlr_log2_low = -8\n"
                     "lr_log2_high = -4\nlr_log2_step = 1\nseeds = 1\nmin_span = 2\n[model]\npreset = 'tiny'\n"
                     "[train]\nsteps = 150\nbatch_size = 4\nseq_len = 32\nwarmup = 0\neval_every = 150\n"
                     "eval_batches = 1\neval_batch_size = 4\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mutransfer.cli", "transfer-check", str(check), "--out", str(out), "--quiet",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = out / "runs.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (runs.exists() and runs.read_text().strip()):
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers  # the pool's two workers (and its resource tracker)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "run the same command again" in proc.stderr.read()
    deadline = time.time() + 10  # the pool's terminate is immediate; an orphan would run on
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker outlived the stopped check"
    n_done = len(read_jsonl(runs))
    assert 1 <= n_done < 10
    assert main(["transfer-check", str(check), "--out", str(out), "--quiet"]) in (0, 1, 3)
    keys = [(r["value"], r["lr_log2"], r["seed"]) for r in read_jsonl(runs)]
    assert len(keys) == 10 and len(set(keys)) == 10  # every grid point once: nothing redone, nothing twice


def test_a_study_stopped_before_its_first_trial_exports_an_empty_table_and_plots(tmp_path):
    """A SIGTERM before any trial was asked used to end in KeyError: 'value' (exit 1, not 143): the
    trials table of an empty study had no columns. Now every column is there, and the plots draw."""
    import optuna
    import pandas as pd

    from proxy_sweeps.export import TRIAL_COLUMNS, export

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="empty", storage=storage)
    (tmp_path / "config.json").write_text('{"study": "empty", "trials": 4, "search": {"lr": {"low": 0.001, '
                                          '"high": 0.1, "log": true}}}')
    summary = export(study, tmp_path, {"study": "empty", "trials": 4, "storage": "journal"})
    df = pd.read_parquet(tmp_path / "trials.parquet")
    assert df.empty and tuple(df.columns) == TRIAL_COLUMNS
    assert (tmp_path / "plots" / "optimization_history.png").is_file()
    assert summary.get("best") is None

