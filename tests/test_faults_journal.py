"""Fault injection for a sweep's storage and directory: a torn, emptied or garbled journal, a
directory that holds another study's outputs, two sweeps on one directory at once, a stop at any
moment and an --out that cannot be written. Each is refused with exit status 2 naming the file (and
the line), or stops with 128 + the signal, and never changes what is on disk silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mutransfer.cli import main
from tests.test_faults_sweep import ROOT, study, sweep_file

JOURNAL = "optuna-journal.log"


def sweep(path: Path, out: Path, *args: str) -> int:
    return main(["sweep", str(path), "--out", str(out), "--quiet", "--threads", "1", *args])


def command(path: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mutransfer.cli", "sweep", str(path), "--out", str(out), "--quiet", "--threads",
            "1", *args]


def wait_for(condition, proc: subprocess.Popen | None = None, seconds: float = 180) -> None:
    """Poll until ``condition()``; fails (with the process's stderr) if it never comes or the process ends."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended ({proc.returncode}) first: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-trial sweep directory (each test works on its own copy)."""
    root = tmp_path_factory.mktemp("finished")
    path, out = sweep_file(root, trials=2, steps=6), root / "out"
    assert sweep(path, out) == 0
    return path, out


def copy_of(finished, tmp_path: Path) -> tuple[Path, Path]:
    path, out = finished
    shutil.copytree(out, tmp_path / "out")
    return path, tmp_path / "out"


# ---------------------------------------------------------------- the journal: torn, garbled, emptied


def _lines(journal: Path) -> list[bytes]:
    return journal.read_bytes().splitlines(keepends=True)


def torn(journal: Path) -> str:
    """A crash mid-write: the last line lacks its end (as `truncate -s -40`)."""
    n = len(_lines(journal))
    os.truncate(journal, journal.stat().st_size - 40)
    return f"line {n}"


def half(journal: Path) -> str:
    """Half the file, cut inside a line."""
    data = journal.read_bytes()
    cut = len(data) // 2 + (data[len(data) // 2 - 1:len(data) // 2] == b"\n")
    journal.write_bytes(data[:cut])
    return f"line {len(data[:cut].splitlines())}"


def garbage_line(journal: Path) -> str:
    n = len(_lines(journal))
    with open(journal, "ab") as f:
        f.write(b"this is not a journal record\n")
    return f"line {n + 1}"


def random_bytes(journal: Path) -> str:
    lines = _lines(journal)
    lines[1] = bytes(range(256)).replace(b"\n", b"") + b"\n"
    journal.write_bytes(b"".join(lines))
    return "line 2"


@pytest.mark.parametrize("damage", [torn, half, garbage_line, random_bytes])
def test_a_damaged_journal_is_refused_naming_the_file_and_line_and_left_as_it_is(finished, tmp_path, capsys, damage):
    """A torn last line used to end in a JSONDecodeError traceback, and the re-run appended after it, so
    the study never loaded again."""
    path, out = copy_of(finished, tmp_path)
    journal = out / JOURNAL
    line = damage(journal)
    before, parquet = journal.read_bytes(), (out / "trials.parquet").read_bytes()
    capsys.readouterr()
    assert sweep(path, out, "--trials", "3") == 2
    err = capsys.readouterr().err
    assert str(journal) in err and line in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert journal.read_bytes() == before  # nothing appended, nothing repaired
    assert (out / "trials.parquet").read_bytes() == parquet


def test_an_intact_copy_of_a_finished_sweep_is_accepted(finished, tmp_path, capsys):
    """The other branch of the checks above and below: the same command on a sound directory runs."""
    path, out = copy_of(finished, tmp_path)
    assert sweep(path, out) == 0  # the budget is spent: export only
    assert len(study(out).trials) == 2
    assert main(["freeze", str(out), "--out", str(tmp_path / "lock.json")]) == 0


def test_freeze_refuses_a_torn_journal_naming_it(finished, tmp_path, capsys):
    path, out = copy_of(finished, tmp_path)
    line = torn(out / JOURNAL)
    capsys.readouterr()
    assert main(["freeze", str(out), "--out", str(tmp_path / "lock.json"), "--storage", str(out / JOURNAL)]) == 2
    err = capsys.readouterr().err
    assert str(out / JOURNAL) in err and line in err and not (tmp_path / "lock.json").exists()


def test_nothing_is_appended_after_a_partial_line(tmp_path):
    import optuna

    from mutransfer.config import ConfigError
    from proxy_sweeps import storage as st

    journal = tmp_path / JOURNAL
    s = optuna.create_study(study_name="faults", storage=st.open_storage(str(journal)))
    s.set_user_attr("a", 1)  # sound file: appended
    assert study(tmp_path).user_attrs["a"] == 1
    os.truncate(journal, journal.stat().st_size - 5)  # another process died mid-write
    before = journal.read_bytes()
    with pytest.raises(ConfigError, match=rf"{journal}.*line 2 is partial"):
        s.set_user_attr("b", 2)
    assert journal.read_bytes() == before


APPEND_PAST_A_SIZE_LIMIT = """
import os, resource, signal, sys, optuna
from proxy_sweeps import storage as st
path = sys.argv[1]
s = optuna.load_study(study_name="faults", storage=st.open_storage(path))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write instead of the default kill
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    s.set_user_attr("long", "x" * 200)
except OSError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("room", [20, 4096])
def test_a_write_cut_short_is_taken_back_so_the_journal_stays_whole(tmp_path, room):
    """The disk filling mid-line (here: a file size limit) leaves no partial line behind; with room
    enough the same write goes through."""
    import optuna

    from proxy_sweeps import storage as st

    journal = tmp_path / JOURNAL
    optuna.create_study(study_name="faults", storage=st.open_storage(str(journal)))
    before = journal.read_bytes()
    run = subprocess.run([sys.executable, "-c", APPEND_PAST_A_SIZE_LIMIT, str(journal), str(room)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    attrs = study(tmp_path).user_attrs
    if room < 200:
        assert "refused" in run.stdout and journal.read_bytes() == before and "long" not in attrs
    else:
        assert "refused" not in run.stdout and attrs["long"] == "x" * 200
    assert journal.read_bytes().endswith(b"\n")


# ---------------------------------------------------------------- another study's outputs in --out


def emptied(out: Path) -> str:
    os.truncate(out / JOURNAL, 0)
    return "no study 'faults'"


def deleted(out: Path) -> str:
    (out / JOURNAL).unlink()
    return "no study 'faults'"


def first_line_only(out: Path) -> str:
    """A valid but shorter journal (an older backup, or cut at a line's end): trials are missing."""
    journal = out / JOURNAL
    journal.write_bytes(_lines(journal)[0])
    return "summary.json"


def other_spec_emptied(out: Path) -> str:
    """An emptied journal, and a sweep file that now searches another range."""
    os.truncate(out / JOURNAL, 0)
    path = out.parent / "faults.toml"
    path.write_text(path.read_text().replace("high = 3e-2", "high = 5e-2"))
    return "different sweep definition"


@pytest.mark.parametrize("damage", [emptied, deleted, first_line_only, other_spec_emptied])
def test_a_directory_whose_storage_lost_its_study_is_refused(finished, tmp_path, capsys, damage):
    """An emptied journal used to start a new study without a word, repeat an old point and overwrite
    trials.parquet."""
    path, out = copy_of(finished, tmp_path)
    path = Path(shutil.copy(path, tmp_path / "faults.toml"))
    what = damage(out)
    parquet = (out / "trials.parquet").read_bytes()
    capsys.readouterr()
    assert sweep(path, out, "--trials", "3") == 2
    err = capsys.readouterr().err
    assert str(out) in err and what in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / "trials.parquet").read_bytes() == parquet


def test_a_directory_of_another_study_is_refused(finished, tmp_path, capsys):
    path, out = copy_of(finished, tmp_path)
    capsys.readouterr()
    assert sweep(path, out, "--study", "other") == 2
    err = capsys.readouterr().err
    assert str(out) in err and "'faults'" in err and "config.json" in err, err
    assert json.loads((out / "config.json").read_text())["study"] == "faults"


# ---------------------------------------------------------------- --out itself


def test_an_out_that_is_a_file_or_under_a_file_is_refused_before_compute(tmp_path, capsys):
    path = sweep_file(tmp_path, trials=1, steps=6)
    a_file = tmp_path / "results"
    a_file.write_text("not a directory")
    for out in (a_file, a_file / "out"):
        capsys.readouterr()
        assert sweep(path, out) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and "Traceback" not in err, err
    assert a_file.read_text() == "not a directory"


def test_a_read_only_out_is_refused_and_a_writable_one_accepted(tmp_path, capsys):
    from mutransfer.config import ConfigError
    from proxy_sweeps.sweep_dir import check_writable

    good = tmp_path / "good" / "out"
    check_writable(good)  # created, and writable
    assert good.is_dir() and list(good.iterdir()) == []  # the probe file is gone
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o555 directory is writable all the same")
        with pytest.raises(ConfigError, match=f"--out {locked}.*not writable"):
            check_writable(locked)
        assert sweep(sweep_file(tmp_path, trials=1, steps=6), locked / "out") == 2
        assert "--out" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- one live sweep per directory


def test_a_second_sweep_on_a_live_directory_is_refused_naming_the_holder(tmp_path):
    """Two sweeps on one --out used to record the same invocation, so their workers drew from the same
    seeds (5 of 11 trials were duplicates asked again), and overwrote each other's config.json."""
    path, out = sweep_file(tmp_path, trials=2, steps=400), tmp_path / "out"
    first = subprocess.Popen(command(path, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: (out / "config.json").is_file(), first)
        second = subprocess.run(command(path, out), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr[-2000:]
        assert str(out) in second.stderr and f"pid {first.pid}" in second.stderr
        assert json.loads((out / "config.json").read_text())["invocation"] == 0
        assert first.poll() is None  # the live sweep goes on
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=180) == 128 + signal.SIGTERM
    from proxy_sweeps.sweep_dir import SweepDirLock

    lock = SweepDirLock(out)  # free again once the live sweep ended
    lock.acquire()
    lock.release()


@pytest.mark.slow
def test_two_sweeps_with_their_own_out_share_one_storage(tmp_path):
    """The lock is on the directory, not on the study: sweeps on several machines (here: two processes)
    with one shared storage and their own --out run side by side, with distinct seeds."""
    path = sweep_file(tmp_path, trials=4, steps=6)
    shared = tmp_path / "shared.log"
    procs = [subprocess.Popen(command(path, tmp_path / f"out{i}", "--storage", str(shared)), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    import optuna

    from proxy_sweeps import storage as st

    s = optuna.load_study(study_name="faults", storage=st.open_storage(str(shared)))
    assert len(s.user_attrs["invocations"]) == 2
    invocations = {json.loads((tmp_path / f"out{i}" / "config.json").read_text())["invocation"] for i in range(2)}
    assert invocations == {0, 1}
    points = [t.params["lr"] for t in s.trials if "duplicate_of" not in t.user_attrs]
    assert len(points) == len(set(points)) == 4


# ---------------------------------------------------------------- a stop at any moment


def _journal_loads(out: Path) -> None:
    from proxy_sweeps import journal

    if (out / JOURNAL).exists():
        journal.check(out / JOURNAL)


@pytest.mark.parametrize("moment", ["out created", "config written"])
def test_a_stop_early_in_the_sweep_exits_128_plus_the_signal(tmp_path, moment):
    """A SIGTERM after config.json was written and before the stop handlers were installed (they came
    after the checks) killed the sweep by the signal (status -15, not 143)."""
    path, out = sweep_file(tmp_path, trials=2, steps=400), tmp_path / "out"
    proc = subprocess.Popen(command(path, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: out.is_dir() if moment == "out created" else (out / "config.json").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    _journal_loads(out)
    if moment == "config written":
        assert (out / "trials.parquet").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


@pytest.mark.slow
def test_a_stop_during_trials_exits_128_plus_the_signal(tmp_path):
    from optuna.trial import TrialState

    path, out = sweep_file(tmp_path, trials=2, steps=400), tmp_path / "out"
    proc = subprocess.Popen(command(path, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (out / "config.json").is_file() and any(
        t.state == TrialState.RUNNING for t in study(out).trials), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 128 + signal.SIGINT, proc.stderr.read()[-2000:]
    _journal_loads(out)
    assert (out / "trials.parquet").is_file()
