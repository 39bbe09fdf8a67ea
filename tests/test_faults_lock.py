"""Fault injection for the hparams lock file: every field typed when the lock is read (laws and
provenance included), ``freeze --out`` checked before any work, and ``freeze`` warning (and
recording in the lock) when a frozen value sits at its search range's edge or an attached law's
check did not pass; ``--strict`` turns the warnings into exit 1.

Sweep and transfer-check directories are written here synthetically (a journal study with
finished trials, a verdict.json): freeze reads only those, so no trial is trained.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tomllib
from pathlib import Path

import pytest

from mutransfer.cli import main
from mutransfer.lockfile import content_hash, read_lock
from tests.sweep_files import TINY_TRIAL

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "full_scale" / "smoke.toml"
SMOKE_LOCK = ROOT / "full_scale" / "smoke.hparams.lock.json"
RECIPE_LOCK = ROOT / "full_scale" / "xmodel25_recipe.lock.json"
# The smoke run in 11 steps (what `train` would do if a bad lock got through): seconds on CPU.
SHORT = ["--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2", "--set", "stages.stable2.steps=2",
         "--set", "stages.decay.steps=3", "--set", "stages.long_context.phases.0.steps=1",
         "--set", "stages.long_context.phases.1.steps=1", "--set", "train.eval_every=4"]


# ---------------------------------------------------------------- synthetic transfer checks and sweeps


def write_check(out: Path, outcome: str = "pass", beta: float = 0.5, axis: str = "steps") -> Path:
    """A transfer-check directory as `mutransfer transfer-check` leaves it, reduced to what a law needs."""
    out.mkdir(parents=True)
    verdict = {"axis": axis, "tune": "lr", "outcome": outcome, "reasons": [f"synthetic {outcome}"],
               "values": [60, 120, 240, 480],
               "law": {"law": {"beta": {"estimate": beta, "ci": [beta - 0.1, beta + 0.1]},
                               "a": {"estimate": -3.0, "ci": [-3.2, -2.8]},
                               "residual": {"estimate": 0.05, "ci": [-0.1, 0.2]}}}}
    (out / "verdict.json").write_text(json.dumps(verdict))
    (out / "config.json").write_text(json.dumps({"spec": {"train": {"seq_len": 32, "batch_size": 4}}}))
    return out


# Three searched parameters: a log-scale float, a linear float starting at 0, an integer (schedule).
SEARCH = {"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "weight_decay": {"low": 0.0, "high": 0.2},
          "warmup": {"low": 0, "high": 6}}
INSIDE = {"lr": 0.01, "weight_decay": 0.1, "warmup": 3}


def write_sweep(out: Path, best: dict, search: dict | None = None) -> Path:
    """A sweep directory (config.json + journal) whose study holds finished trials, ``best`` the best."""
    import optuna

    from proxy_sweeps import storage as st
    from proxy_sweeps.spec import spec_from_mapping

    search = search or SEARCH
    raw = tomllib.loads(TINY_TRIAL.format(steps=12)) | {"sweep": {"name": "lock"}, "objective": {"last_evals": 1},
                                                         "search": copy.deepcopy(search)}
    spec = spec_from_mapping(raw)  # the sweep file is valid, as a real sweep's is
    out.mkdir(parents=True)
    url = st.default_storage(out)
    (out / "config.json").write_text(json.dumps({"study": "lock", "storage": url, "trials": 3, "spec": raw,
                                                 "data_fingerprint": "synthetic"}))
    dists = {}
    for p in spec.search:
        if p.choices is not None:
            dists[p.name] = optuna.distributions.CategoricalDistribution(p.choices)
        elif p.is_int:
            dists[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high))
        else:
            dists[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" on the tests' stderr
    try:
        study = optuna.create_study(study_name="lock", storage=st.open_storage(url), direction="minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    worse = {p.name: (p.choices[0] if p.choices is not None else p.low) for p in spec.search}
    for value, params in ((3.0, worse), (2.0, best)):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=value, params=params,
                                                  distributions=dists,
                                                  user_attrs={"seed_values": [value], "outcome": "complete"}))
    return out


def no_temp_files(folder: Path) -> bool:
    return not list(folder.glob(".*.tmp"))


# ---------------------------------------------------------------- the lock is typed when read


def smoke_body() -> dict:
    """The smoke lock with a horizon law and the proxy's budget, as `freeze --law` writes them."""
    from mutransfer.laws import law_from_verdict

    body = {k: v for k, v in json.loads(SMOKE_LOCK.read_text()).items() if k != "content_hash"}
    verdict = {"axis": "steps", "tune": "lr", "outcome": "pass", "reasons": [], "values": [60, 120, 240, 480],
               "law": {"law": {"beta": {"estimate": 0.5, "ci": [0.4, 0.6]}, "a": {"estimate": -3.0},
                               "residual": {"estimate": 0.05, "ci": [-0.1, 0.2]}}}}
    body["laws"] = {"horizon": law_from_verdict(verdict, {"spec": {"train": {"seq_len": 32, "batch_size": 4}}}, "h")}
    body["provenance"] = {"source": "test", "proxy_train": {"steps": 120, "batch_size": 8, "seq_len": 128}}
    return body


def write_body(path: Path, body: dict) -> Path:
    path.write_text(json.dumps({**body, "content_hash": content_hash(body)}))
    return path


def _set(key):
    def edit(body, value):
        *parents, last = key.split(".")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _drop(body, _):
    del body["laws"]["horizon"]["beta"]


def _rename(body, _):
    body["laws"]["depth"] = body["laws"].pop("horizon")


def _swap(body, _):
    body["laws"]["batch"] = body["laws"].pop("horizon")


BAD_LOCKS = [  # (id, edit, value, the field the message must name)
    ("string-beta", _set("laws.horizon.beta"), "0.5", "lock.laws.horizon.beta"),
    ("missing-beta", _drop, None, "lock.laws.horizon.beta"),
    ("nan-beta", _set("laws.horizon.beta"), math.nan, "lock.laws.horizon.beta"),
    ("inf-a", _set("laws.horizon.a"), math.inf, "lock.laws.horizon.a"),
    ("string-steps", _set("provenance.proxy_train.steps"), "120", "lock.provenance.proxy_train.steps"),
    ("zero-batch", _set("provenance.proxy_train.batch_size"), 0, "lock.provenance.proxy_train.batch_size"),
    ("float-seq-len", _set("provenance.proxy_train.seq_len"), 128.5, "lock.provenance.proxy_train.seq_len"),
    ("unknown-law-kind", _rename, None, "lock.laws.depth"),
    ("law-under-the-other-kind", _swap, None, "lock.laws.batch"),
    ("unknown-outcome", _set("laws.horizon.outcome"), "maybe", "lock.laws.horizon.outcome"),
    ("zero-tokens-per-step", _set("laws.horizon.tokens_per_step"), 0, "lock.laws.horizon.tokens_per_step"),
    ("provenance-typo", _set("provenance.proxy_trian"), {}, "lock.provenance.proxy_trian"),
    ("string-provenance", _set("provenance"), "by hand", "lock.provenance"),
    ("bad-warning", _set("warnings"), [{"kind": "range_edge"}], "lock.warnings[0].field"),
    ("unknown-top-level", _set("extra"), 1, "lock.extra"),
]


@pytest.mark.parametrize("edit, value, field", [pytest.param(*c[1:], id=c[0]) for c in BAD_LOCKS])
def test_plan_refuses_a_badly_typed_lock_naming_the_field(tmp_path, capsys, edit, value, field):
    body = smoke_body()
    edit(body, value)
    lock = write_body(tmp_path / "bad.lock.json", body)
    # even when the config does not ask for the law: a lock is read whole, or not at all
    assert main(["plan", str(SMOKE), "--hparams", str(lock), "--set", "transfer.horizon='off'"]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1, err  # one line, no traceback


@pytest.mark.parametrize("edit, value, field", [pytest.param(*c[1:], id=c[0]) for c in BAD_LOCKS
                                                if c[0] in ("string-beta", "missing-beta", "nan-beta",
                                                            "string-steps")])
def test_train_refuses_the_same_locks_before_compute(tmp_path, capsys, edit, value, field):
    body = smoke_body()
    edit(body, value)
    lock = write_body(tmp_path / "bad.lock.json", body)
    out = tmp_path / "run"
    assert main(["train", str(SMOKE), "--hparams", str(lock), "--out", str(out), "--quiet",
                 "--set", "transfer.horizon='off'", *SHORT]) == 2
    assert field in capsys.readouterr().err
    assert not out.exists()


def test_the_good_lock_of_these_tests_is_accepted_by_plan_and_train(tmp_path, capsys):
    """The other branch: the unedited lock reads, plans and loads for training."""
    from full_scale.config import load_run_config

    lock = write_body(tmp_path / "good.lock.json", smoke_body())
    assert read_lock(lock).laws.horizon.beta == 0.5
    assert main(["plan", str(SMOKE), "--hparams", str(lock), "--set", "transfer.horizon='fitted'"]) == 0
    assert "corrected by the fitted laws (horizon x" in capsys.readouterr().out
    cfg = load_run_config(str(SMOKE), ["transfer.horizon='fitted'"], str(lock))
    # beta = 0.5 from the proxy's 120 x 8 x 128 tokens to the smoke run's own
    assert cfg.lr_correction["factor"] == pytest.approx((cfg.stages.total_tokens / (120 * 8 * 128)) ** -0.5)
    assert cfg.to_json()["hparams_lock"]["warnings"] == []


def test_the_shipped_locks_still_read():
    smoke, recipe = read_lock(SMOKE_LOCK), read_lock(RECIPE_LOCK)
    assert smoke.provenance["source"].startswith("written by hand") and smoke.hparams.alpha_in == 4.0
    assert recipe.param.parametrization == "xmodel" and recipe.provenance["source"] == "published recipe"
    for lock in (smoke, recipe):
        assert lock.laws.horizon is None and lock.laws.batch is None and lock.warnings == ()
        assert lock.proxy_train is None


def numbers(node, path: str = "lock"):
    """(dotted path, parent, key) of every number in a lock's JSON object."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield where, node, key
        else:
            yield from numbers(value, where)


def test_every_number_of_a_frozen_lock_refuses_nan_naming_its_path(tmp_path):
    """Discovered from a lock freeze wrote with a law (every record present), not from a list here."""
    from mutransfer.config import ConfigError

    sweep = write_sweep(tmp_path / "sweep", INSIDE)
    good = tmp_path / "good.lock.json"
    assert main(["freeze", str(sweep), "--out", str(good), "--law", str(write_check(tmp_path / "horizon"))]) == 0
    body = {k: v for k, v in json.loads(good.read_text()).items() if k != "content_hash"}
    paths = [where for where, _, _ in numbers(body)]
    assert {"lock.laws.horizon.beta", "lock.provenance.proxy_train.steps", "lock.provenance.objective.value",
            "lock.provenance.schedule_params.warmup", "lock.hparams.lr", "lock.proxy_model.d_model"} <= set(paths)
    assert len(paths) > 60
    for i, where in enumerate(paths):
        bad = copy.deepcopy(body)
        _, parent, key = [n for n in numbers(bad)][i]
        parent[key] = math.nan
        with pytest.raises(ConfigError, match=re.escape(where) + r"(?![\w.\[])"):
            read_lock(write_body(tmp_path / "bad.lock.json", bad))


# ---------------------------------------------------------------- freeze --out


def test_freeze_writes_a_lock_that_reads_back_with_its_law(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", INSIDE)
    check = write_check(tmp_path / "horizon")
    out = tmp_path / "hparams.lock.json"
    assert main(["freeze", str(sweep), "--out", str(out), "--law", str(check)]) == 0
    assert "warning:" not in capsys.readouterr().err
    lock = read_lock(out)
    assert lock.hparams.lr == pytest.approx(0.01) and lock.hparams.weight_decay == pytest.approx(0.1)
    assert lock.provenance["schedule_params"] == {"warmup": 3} and lock.proxy_train.warmup == 3
    assert lock.laws.horizon.outcome == "pass" and lock.warnings == ()
    assert json.loads(out.read_text())["warnings"] == []  # checked and clean, said in the file


def test_freeze_of_a_copied_sweep_directory_reads_the_journal_that_travelled_with_it(tmp_path, capsys):
    """A run directory copied off a cluster records the cluster's absolute journal path; the original
    is gone here, and the copy's own journal is the study."""
    import shutil

    original = write_sweep(tmp_path / "cluster" / "sweep", INSIDE)
    copy_dir = tmp_path / "laptop" / "sweep"
    shutil.copytree(original, copy_dir)
    shutil.rmtree(tmp_path / "cluster")
    out = tmp_path / "hparams.lock.json"
    assert main(["freeze", str(copy_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "using the journal in the directory" in err and str(copy_dir / "optuna-journal.log") in err
    assert read_lock(out).hparams.lr == pytest.approx(0.01)
    # the directory where it was written: no note, the recorded journal is the directory's own
    out2 = tmp_path / "again.lock.json"
    assert main(["freeze", str(write_sweep(tmp_path / "here", INSIDE)), "--out", str(out2)]) == 0
    assert "using the journal" not in capsys.readouterr().err


def _out_cases(tmp_path: Path):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    return [("a_dir", tmp_path / "a_dir", "is a directory"),
            ("a_file/lock.json", tmp_path / "a_file" / "lock.json", "is not a directory"),
            ("missing/lock.json", tmp_path / "missing" / "lock.json", "does not exist")]


def test_freeze_out_is_checked_before_any_work_and_leaves_no_temp_file(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", INSIDE)
    for name, out, message in _out_cases(tmp_path):
        # a sweep directory that does not exist: the --out error comes first, before the study is read
        for source in (sweep, tmp_path / "no_sweep"):
            assert main(["freeze", str(source), "--out", str(out)]) == 2, name
            err = capsys.readouterr().err
            assert f"--out {out}" in err and message in err and err.count("\n") == 1, err
        assert no_temp_files(tmp_path) and no_temp_files(out.parent if out.parent.is_dir() else tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file", "sweep"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_freeze_out_in_a_read_only_directory_is_refused(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", INSIDE)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["freeze", str(sweep), "--out", str(locked / "lock.json")]) == 2
        assert f"--out {locked / 'lock.json'}" in capsys.readouterr().err
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)
    assert main(["freeze", str(sweep), "--out", str(locked / "lock.json")]) == 0  # writable again: written


def test_an_atomic_write_that_fails_removes_its_temp_file(tmp_path):
    from mutransfer.rundir import write_json

    (tmp_path / "target").mkdir()
    with pytest.raises(OSError):
        write_json(tmp_path / "target", {"a": 1})  # os.replace onto a directory fails
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"a": object()} | {1j: 2})  # not serialisable (a complex key)
    assert no_temp_files(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


# ---------------------------------------------------------------- freeze warns: range edges, laws


@pytest.mark.parametrize("name, value, edge", [
    # log scale 1e-3 .. 1e-1: 5 % of the log-width is 10^0.1 = x1.259 from either end
    ("lr", 1.25e-3, "low"), ("lr", 1.27e-3, None), ("lr", 0.01, None), ("lr", 0.0794, None), ("lr", 0.0795, "high"),
    ("lr", 0.1, "high"),
    # linear 0 .. 0.2: 5 % is 0.01 from either end
    ("weight_decay", 0.0, "low"), ("weight_decay", 0.0101, None), ("weight_decay", 0.1899, None),
    ("weight_decay", 0.19, "high"),
    # integer 0 .. 6 (linear): only the ends themselves are within 0.3
    ("warmup", 0, "low"), ("warmup", 1, None), ("warmup", 5, None), ("warmup", 6, "high"),
])
def test_where_a_value_sits_in_its_search_range(name, value, edge):
    from proxy_sweeps.freeze import range_edge
    from proxy_sweeps.spec import NamedSearchParam

    assert range_edge(NamedSearchParam(name=name, **SEARCH[name]), value) == edge


def test_choices_have_edges_too():
    from proxy_sweeps.freeze import range_edge
    from proxy_sweeps.spec import NamedSearchParam

    p = NamedSearchParam(name="lr", choices=[0.03, 0.01, 0.003])
    assert [range_edge(p, v) for v in (0.003, 0.01, 0.03)] == ["low", None, "high"]


def test_a_best_inside_its_ranges_freezes_without_a_warning(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", INSIDE)
    out = tmp_path / "lock.json"
    assert main(["freeze", str(sweep), "--out", str(out), "--strict"]) == 0
    assert "warning:" not in capsys.readouterr().err and read_lock(out).warnings == ()


def test_a_best_at_its_ranges_edge_is_warned_recorded_and_refused_with_strict(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", {"lr": 0.01, "weight_decay": 0.2, "warmup": 6})
    out = tmp_path / "lock.json"
    assert main(["freeze", str(sweep), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: warmup = 6 sits at the high edge" in err and "warning: weight_decay = 0.2 sits" in err
    assert "warning: lr" not in err  # lr is inside its range: no warning for it
    lock = read_lock(out)
    assert [(w.kind, w.field) for w in lock.warnings] == [("range_edge", "warmup"), ("range_edge", "weight_decay")]
    assert main(["plan", "tiny", "--hparams", str(out)]) == 0  # plan shows them later, a line each
    plan_out = capsys.readouterr().out
    assert plan_out.count("lock warning: ") == 2 and "warmup = 6 sits at the high edge" in plan_out

    strict = tmp_path / "strict.lock.json"
    assert main(["freeze", str(sweep), "--out", str(strict), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "warning: warmup = 6" in err and "--strict" in err
    assert not strict.exists() and no_temp_files(tmp_path)


def test_a_value_set_by_hand_is_not_judged_against_the_range(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", {"lr": 0.01, "weight_decay": 0.2, "warmup": 3})
    out = tmp_path / "lock.json"
    assert main(["freeze", str(sweep), "--out", str(out), "--strict", "--set", "hparams.weight_decay=0.05"]) == 0
    assert read_lock(out).warnings == () and read_lock(out).hparams.weight_decay == 0.05


@pytest.mark.parametrize("outcome", ["pass", "inconclusive", "fail"])
def test_a_law_whose_check_did_not_pass_is_warned_and_recorded(tmp_path, capsys, outcome):
    sweep = write_sweep(tmp_path / "sweep", INSIDE)
    check = write_check(tmp_path / "horizon", outcome)
    out = tmp_path / "lock.json"
    assert main(["freeze", str(sweep), "--out", str(out), "--law", str(check)]) == 0
    err = capsys.readouterr().err
    lock = read_lock(out)
    assert lock.laws.horizon.outcome == outcome
    if outcome == "pass":
        assert "warning:" not in err and lock.warnings == ()
        return
    assert f"warning: the horizon law's transfer check ({check}) was {outcome}" in err
    assert [(w.kind, w.field) for w in lock.warnings] == [("law_outcome", "laws.horizon")]
    strict = tmp_path / "strict.lock.json"
    assert main(["freeze", str(sweep), "--out", str(strict), "--law", str(check), "--strict"]) == 1
    assert not strict.exists() and no_temp_files(tmp_path)


def test_plan_prints_no_warning_line_for_a_clean_lock(capsys):
    assert main(["plan", "tiny", "--hparams", str(SMOKE_LOCK), "--param", "mup"]) == 0
    assert "lock warning" not in capsys.readouterr().out
