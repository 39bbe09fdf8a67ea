"""The README's pasted workflow (sweep -> freeze -> plan -> train -> report) run end to end, as a user
would paste it, with smaller budgets appended: the lock the sweep froze is the one train uses."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Appended to each command so the whole block runs in about a minute on 2 cores; nothing else changes.
SMALLER = {
    "sweep": ["--trials", "2", "--set", "train.steps=60", "--set", "train.eval_every=20"],
    "train": ["--quiet"] + [a for s in ("stages.warmup.steps=2", "stages.stable1.steps=2", "stages.stable2.steps=2",
                                        "stages.decay.steps=2", "stages.long_context.phases.0.steps=1",
                                        "stages.long_context.phases.1.steps=1", "train.eval_every=4")
                            for a in ("--set", s)],
}


def workflow_block() -> list[list[str]]:
    """The commands of the first bash block of the README's Workflow section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Workflow"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_workflow_block_is_sweep_freeze_plan_train_report():
    commands = workflow_block()
    assert [c[:2] for c in commands] == [["mutransfer", k] for k in ("sweep", "freeze", "plan", "train", "report")]
    frozen = commands[1][commands[1].index("--out") + 1]
    for used in commands[2:4]:  # plan and train use the lock the sweep just froze
        assert used[used.index("--hparams") + 1] == frozen


@pytest.mark.slow
def test_the_readme_workflow_runs_end_to_end(tmp_path):
    for package in ("proxy_sweeps", "full_scale"):  # the README's paths, relative to a checkout
        (tmp_path / package).symlink_to(ROOT / package)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for command in workflow_block():
        argv = [sys.executable, "-m", "mutransfer.cli", *command[1:], *SMALLER.get(command[1], [])]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"
    lock = json.loads((tmp_path / "hparams.lock.json").read_text())
    run = json.loads((tmp_path / "runs" / "smoke" / "config.json").read_text())
    assert run["hparams_lock"]["content_hash"] == lock["content_hash"]  # train used the frozen lock
    assert run["hparams_lock"]["provenance"]["study"] == "quickstart"
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "report.md").is_file()
