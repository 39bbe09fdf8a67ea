"""A sweep with three workers against a real PostgreSQL (started by .ci/postgres.sh): every trial
is there exactly once. Skipped when no PostgreSQL server binaries are installed, unless
MUTRANSFER_REQUIRE_POSTGRES is set (CI sets it, so there it fails instead)."""

from __future__ import annotations

import glob
import os
import subprocess
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from mutransfer.cli import main
from mutransfer.lockfile import read_lock
from proxy_sweeps import storage as st
from tests.sweep_files import TINY_TRIAL

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "postgres.sh"

SWEEP = """
[sweep]
trials = 6
heartbeat_interval = 1
grace_period = 60
""" + TINY_TRIAL.format(steps=12) + """
[objective]
last_evals = 1
[sampler]
n_startup_trials = 2
[search.lr]
low = 1e-3
high = 3e-2
log = true
[search.alpha_out]
choices = [0.5, 1.0, 2.0]
"""


@pytest.fixture(scope="module")
def pg_url() -> str:
    if os.environ.get("MUTRANSFER_PG_URL"):
        return os.environ["MUTRANSFER_PG_URL"]
    required = bool(os.environ.get("MUTRANSFER_REQUIRE_POSTGRES"))
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not required:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin); run .ci/postgres.sh as root to "
                    "install them, or set MUTRANSFER_REQUIRE_POSTGRES=1 to make this a failure")
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("export MUTRANSFER_PG_URL=")]
    assert line, run.stdout
    return line[-1].split("=", 1)[1]


@pytest.mark.slow
def test_three_workers_on_postgres_every_trial_exactly_once(tmp_path, pg_url):
    path = tmp_path / "pg.toml"
    path.write_text(SWEEP)
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    rc = main(["sweep", str(path), "--storage", pg_url, "--workers", "3", "--threads", "1", "--study", study_name,
               "--out", str(out), "--quiet"])
    assert rc == 0
    study = optuna.load_study(study_name=study_name, storage=st.open_storage(pg_url))
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert len(list((out / "logs").glob("worker-*.log"))) == 3
    assert sorted(pd.read_parquet(out / "trials.parquet")["number"]) == list(range(6))
    lock = tmp_path / "lock.json"
    assert main(["freeze", str(out), "--out", str(lock)]) == 0
    assert read_lock(lock).provenance["storage"].startswith("postgresql")
