"""Experiment tracking: every command's curves, read back with each backend's own reader.

Real runs, offline: TensorBoard event files (its ``EventAccumulator``), an MLflow sqlite store in
the run directory (``MlflowClient``), W&B in offline mode (the run's ``.wandb`` file), trackio's
local database (its ``SQLiteStorage``). The files the commands write stay the reference: every
tracked number is compared with metrics.jsonl, Optuna's trial values, runs.jsonl or coord.parquet.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from full_scale.checkpoint import FAILPOINT_ENV
from full_scale.config import load_run_config
from mutransfer.cli import main
from mutransfer.config import ConfigError, parse
from mutransfer.rundir import read_jsonl
from mutransfer.tracking import TrackingSettings, check_installed, track_override
from mutransfer.tracking.wandb_offline import offline_runs, read_offline_run
from proxy_sweeps import storage as st
from tests.test_faults import SHORT, SMOKE, TOTAL
from tests.test_recipe_choices import XMODEL, plan_says, train_says

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
ALL = "tensorboard,wandb,mlflow,trackio"
# TensorBoard stores scalars as float32: a float64 loss comes back to within float32 rounding.
F32 = 1e-6


def offline_env(tmp: Path) -> dict:
    """Trackers offline and inside ``tmp``: no network, nothing written to the home directory."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_DATA_DIR": str(tmp / "wandb-data"),
           "TRACKIO_DIR": str(tmp / "trackio"), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The same environment for in-process commands."""
    for key, value in offline_env(tmp_path).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def train(out: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mutransfer.cli", "train", str(SMOKE), "--out", str(out), "--quiet", *SHORT, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_texts(logdir: Path) -> dict[str, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in
                                                acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def mlflow_runs(root: Path, project: str = "mutransfer") -> dict:
    client = mlflow_client(root)
    exp = client.get_experiment_by_name(project)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def same(a: list[tuple[int, float]], b: list[tuple[int, float]], rel: float = 0.0) -> bool:
    """The same steps, and values equal to within ``rel`` (NaN equals NaN)."""
    if [s for s, _ in a] != [s for s, _ in b]:
        return False
    return all(math.isclose(x, y, rel_tol=rel) or (math.isnan(x) and math.isnan(y))
               for (_, x), (_, y) in zip(a, b, strict=True))


# ---------------------------------------------------------------- the settings and the flag


def test_backends_are_checked_by_name():
    ok = parse(TrackingSettings, {"backends": ["tensorboard", "wandb"], "project": "p"}, "tracking")
    assert ok.backends == ["tensorboard", "wandb"]
    assert parse(TrackingSettings, {}, "tracking").backends == []
    with pytest.raises(ConfigError, match=r"tracking\.backends\[1\]: input should be 'tensorboard', 'wandb', "
                                          r"'mlflow' or 'trackio' \(got 'neptune'\)"):
        parse(TrackingSettings, {"backends": ["wandb", "neptune"]}, "tracking")
    with pytest.raises(ConfigError, match="names a backend twice"):
        parse(TrackingSettings, {"backends": ["wandb", "wandb"]}, "tracking")
    assert track_override("tensorboard, mlflow") == 'tracking.backends=["tensorboard", "mlflow"]'
    assert track_override("none") == "tracking.backends=[]"
    with pytest.raises(ConfigError, match=r"--track tensorboard,comet: unknown backend 'comet'; allowed: "
                                          r"\['tensorboard', 'wandb', 'mlflow', 'trackio'\] or 'none'"):
        track_override("tensorboard,comet")


@pytest.mark.parametrize("args, message", [
    (["--track", "comet"], "--track comet: unknown backend 'comet'"),
    (["--set", 'tracking.backends=["comet"]'], "tracking.backends[0]: input should be 'tensorboard'"),
    (["--set", "metrics.tensorboard=true"], "metrics.tensorboard: replaced by the [tracking] table"),
])
def test_train_refuses_an_unknown_backend_before_compute(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", str(SMOKE), "--out", str(out), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("sets, message", [
    (["metrics.tensorboard=true"], "metrics.tensorboard: replaced by the [tracking] table"),
    (['tracking.backends=["comet"]'], "tracking.backends[0]: input should be 'tensorboard'"),
])
def test_plan_and_train_refuse_a_bad_tracking_table_alike(capsys, tmp_path, sets, message):
    plan_rc, plan_err = plan_says(capsys, sets)
    train_rc, train_err = train_says(capsys, tmp_path, sets)
    assert (plan_rc, train_rc) == (2, 2)
    assert message in plan_err and plan_err == train_err and "\n" not in plan_err
    assert not (tmp_path / "run").exists()


def test_plan_accepts_the_tracking_table_train_also_checks_the_backend_is_installed(capsys, monkeypatch):
    sets = ['tracking.backends=["tensorboard", "mlflow"]', 'tracking.project="xmodel25"']
    plan_rc, plan_err = plan_says(capsys, sets)
    assert plan_rc in (0, 1), plan_err  # 1: a stage does not fit, a verdict, not a refusal
    assert load_run_config(XMODEL, sets).tracking.backends == ["tensorboard", "mlflow"]  # train's checks
    # Whether a package is installed is this machine's, like the precision backend: plan (maybe on
    # a laptop) accepts the table, train refuses before compute and names the extra.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    plan_rc, plan_err = plan_says(capsys, sets)
    assert plan_rc in (0, 1), plan_err
    with pytest.raises(ConfigError, match=r'tensorboard package is not installed.*pip install -e "\.\[tensorboard\]"'):
        load_run_config(XMODEL, sets)


@pytest.mark.parametrize("command", ["train", "sweep", "transfer-check", "coord-check"])
def test_a_chosen_backend_that_is_not_installed_names_the_extra_before_compute(tmp_path, capsys, monkeypatch,
                                                                              command):
    check_installed(parse(TrackingSettings, {"backends": ["tensorboard"]}, "tracking"))  # installed here: accepted
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tensorboard\]"'):
        check_installed(parse(TrackingSettings, {"backends": ["tensorboard"]}, "tracking"))
    out = tmp_path / "out"
    file = {"train": SMOKE, "sweep": ROOT / "proxy_sweeps" / "quickstart.toml",
            "transfer-check": ROOT / "proxy_sweeps" / "lr_transfer_tiny.toml", "coord-check": "tiny"}[command]
    assert main([command, str(file), "--out", str(out), "--track", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "'tensorboard' is chosen but the tensorboard package is not installed" in err
    assert 'pip install -e ".[tensorboard]"' in err
    assert not (out / "tensorboard").exists() and not (out / "checkpoints").exists()


def test_a_backend_that_cannot_open_its_store_is_a_config_error(tmp_path, capsys, offline):
    from mutransfer.tracking import Tracking

    bad = parse(TrackingSettings, {"backends": ["mlflow"], "mlflow_uri": "nosuch://x"}, "tracking")
    with pytest.raises(ConfigError, match=r"tracking.backends: mlflow could not start run 'r'.*unsupported URI "
                                          r"'nosuch://x'.*check tracking.mlflow_uri"):
        Tracking(bad, tmp_path).start("r", "g", {})
    out = tmp_path / "sweep"  # a sweep opens the store before its workers start: nothing trains
    assert main(["sweep", str(ROOT / "proxy_sweeps" / "quickstart.toml"), "--out", str(out), "--quiet",
                 "--track", "mlflow", "--set", 'tracking.mlflow_uri="nosuch://x"']) == 2
    assert "mlflow cannot open its store" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    good = parse(TrackingSettings, {"backends": ["mlflow"]}, "tracking")  # the default store opens
    with Tracking(good, tmp_path) as tracking:
        assert set(tracking.start("r", "g", {"lr": 0.5})) == {"mlflow"}
        tracking.log({"loss": 2.5}, 0)
    (run,) = mlflow_runs(tmp_path).values()
    assert run.data.metrics == {"loss": 2.5} and run.data.params == {"lr": "0.5"}


def test_a_backend_that_fails_during_a_run_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, capsys,
                                                                                            offline):
    from mutransfer.tracking import Tracking

    settings = parse(TrackingSettings, {"backends": ["mlflow", "tensorboard"]}, "tracking")
    with Tracking(settings, tmp_path) as tracking:
        ids = tracking.start("r", "g", {})
        tracking.log({"loss": 3.0}, 0)
        assert len(tracking.backends) == 2 and "warning" not in capsys.readouterr().err
        mlflow_client(tmp_path).delete_run(ids["mlflow"])  # e.g. deleted in the UI while the run trains
        tracking.log({"loss": 2.0, **{f"m/{i}": i for i in range(600)}}, 1)  # a full batch: sent now, refused
        tracking.log({"loss": 1.0}, 2)
        assert [b.name for b in tracking.backends] == ["tensorboard"]
    err = capsys.readouterr().err
    assert err.count("warning: tracking: mlflow failed") == 1 and "must be in the 'active' state" in err
    assert tb_scalars(tmp_path / "tensorboard" / "r")["loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]


# ---------------------------------------------------------------- train: every backend at once


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke run (five stages, the Muon switch, 11 steps) fed to all four backends."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = offline_env(tmp)
    out = tmp / "smoke-run"
    done = train(out, env, "--track", ALL)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(TOTAL))
    return {"out": out, "env": env, "rows": rows, "events": read_jsonl(out / "events.jsonl"),
            "ids": json.loads((out / "tracking.json").read_text()), "stdout": done.stdout}


def curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def lr_curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    groups = sorted({g for r in rows for g in r["lr"]})
    return {f"lr/{g}": [(r["step"], r["lr"][g]) for r in rows if g in r["lr"]] for g in groups}


def test_train_result_stays_the_only_stdout(trained):
    assert json.loads(trained["stdout"])["final_loss"] == trained["rows"][-1]["loss"]  # trackers print to stderr


def test_train_tensorboard_holds_every_metric_and_event(trained):
    rows, logdir = trained["rows"], trained["out"] / "tensorboard" / "smoke-run"
    scalars = tb_scalars(logdir)
    for key in ("loss", "val_loss", "grad_norm", "lr_factor", "tokens", "seq_len", "global_batch", "tokens_per_s"):
        assert same(scalars[key], curve(rows, key), F32), key
    lrs = lr_curves(rows)
    assert any(k.startswith("lr/muon/") for k in lrs) and any(k.startswith("lr/adamw/") for k in lrs)
    for key, values in lrs.items():
        assert same(scalars[key], values, F32), key
    texts = tb_texts(logdir)
    switch = [e["step"] for e in trained["events"] if e["event"] == "switch"]
    assert [s for s, _ in texts["events/switch"]] == switch == [6]
    assert json.loads(dict(texts["events/switch"])[6])["to"] == "muon"
    stage_starts = [r["step"] for i, r in enumerate(rows)
                    if i == 0 or (r["stage"], r["phase"]) != (rows[i - 1]["stage"], rows[i - 1]["phase"])]
    assert [s for s, _ in texts["events/stage"]] == stage_starts == [0, 2, 4, 6, 9, 10]
    assert scalars["events/checkpoint"] == [(e["step"], 1.0) for e in trained["events"] if e["event"] == "checkpoint"]
    config = json.loads("\n".join(line[4:] for line in texts["config"][0][1].splitlines()))  # a code block
    assert config["hparams"] == json.loads((trained["out"] / "config.json").read_text())["hparams"]


def test_train_mlflow_run_holds_every_metric_once(trained):
    rows, out = trained["rows"], trained["out"]
    client = mlflow_client(out)
    run = client.get_run(trained["ids"]["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-run" and run.data.tags["group"] == "smoke"
    for key in ("loss", "val_loss", "grad_norm", "tokens_per_step", "mixture_rows/pretrain"):
        expected = curve(rows, key) if "/" not in key else [(r["step"], r["mixture_rows"]["pretrain"]) for r in rows]
        assert history(client, run.info.run_id, key) == expected, key  # float64 end to end: exact
    for key, values in lr_curves(rows).items():
        assert history(client, run.info.run_id, key) == values, key
    config = json.loads((out / "config.json").read_text())
    assert float(run.data.params["hparams.lr"]) == config["hparams"]["lr"]
    assert json.loads(run.data.tags["event.00000006.switch"])["to"] == "muon"


def test_train_wandb_offline_run_holds_every_metric(trained):
    rows, (run_dir,) = trained["rows"], offline_runs(trained["out"])
    run = read_offline_run(run_dir)
    assert (run["name"], run["group"], run["project"], run["id"]) == ("smoke-run", "smoke", "mutransfer",
                                                                     trained["ids"]["wandb"])
    assert run["config"]["hparams"]["lr"] == json.loads((trained["out"] / "config.json").read_text())["hparams"]["lr"]
    by_step = {h["_step"]: h for h in run["history"]}
    assert sorted(by_step) == list(range(TOTAL))
    for key in ("loss", "val_loss", "grad_norm", *lr_curves(rows)):
        got = [(s, h[key]) for s, h in sorted(by_step.items()) if key in h]
        assert got == (lr_curves(rows).get(key) or curve(rows, key)), key  # JSON float64: exact
    assert [s for s, h in sorted(by_step.items()) if "events/switch" in h] == [6]
    assert run["summary"]["event_data/switch"]["to"] == "muon"


def test_train_trackio_run_holds_the_loss_curve(trained):
    pytest.importorskip("trackio")
    code = ("import json, trackio; print(json.dumps(trackio.SQLiteStorage.get_logs('mutransfer', 'smoke-run')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=trained["env"], timeout=120)  # TRACKIO_DIR is read when trackio is imported
    assert done.returncode == 0, done.stderr[-2000:]
    logs = json.loads(done.stdout.splitlines()[-1])
    assert sorted((r["step"], r["loss"]) for r in logs if "loss" in r) == curve(trained["rows"], "loss")


@pytest.mark.slow
def test_untracked_train_writes_no_tracker_files(tmp_path):
    env = offline_env(tmp_path)
    out = tmp_path / "run"
    assert train(out, env).returncode == 0
    assert (out / "metrics.jsonl").is_file()
    assert not [p.name for p in out.iterdir() if p.name in ("tensorboard", "wandb", "mlflow.db", "tracking.json")]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "trackio").exists()


@pytest.mark.slow
def test_a_killed_and_resumed_run_continues_its_tracker_runs_without_gaps_or_repeats(tmp_path):
    env = offline_env(tmp_path)
    out = tmp_path / "run"
    killed = train(out, {**env, FAILPOINT_ENV: "renamed@3"}, "--track", "tensorboard,mlflow")
    assert killed.returncode == -signal.SIGKILL  # after the checkpoint of step 6
    first_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert train(out, env, "--track", "tensorboard,mlflow").returncode == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert json.loads((out / "tracking.json").read_text())["mlflow"] == first_id
    client = mlflow_client(out)
    assert [r.info.run_id for r in mlflow_runs(out).values()] == [first_id]
    assert history(client, first_id, "loss") == curve(rows, "loss")  # every step once
    assert same(tb_scalars(out / "tensorboard" / "run")["loss"], curve(rows, "loss"), F32)


# ---------------------------------------------------------------- a sweep: a tracker run per trial

QUICK = ["--set", "train.steps=12", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
         "--set", "train.warmup=0", "--set", "train.eval_every=6", "--set", "train.eval_batches=1",
         "--set", "train.eval_batch_size=4", "--set", "search.warmup.high=10", "--set", "pruner.kind=none",
         "--set", "sweep.heartbeat_interval=1", "--set", "sweep.grace_period=60"]


@pytest.mark.slow
def test_sweep_trials_are_tracker_runs_grouped_by_study(tmp_path, offline):
    out = tmp_path / "sweep"
    assert main(["sweep", str(ROOT / "proxy_sweeps" / "quickstart.toml"), "--out", str(out), "--trials", "2",
                 "--workers", "2", "--threads", "1", "--quiet", "--track", "mlflow,wandb", *QUICK]) == 0
    study = optuna.load_study(study_name="quickstart", storage=st.open_storage(st.default_storage(out)))
    trials = {f"trial-{t.number:04d}": t for t in study.get_trials()}
    assert len(trials) == 2
    client, runs = mlflow_client(out), mlflow_runs(out)
    assert sorted(runs) == sorted(trials)
    for name, t in trials.items():
        run = runs[name]
        assert run.data.tags["group"] == "quickstart" and run.info.status == "FINISHED"
        assert float(run.data.params["lr"]) == t.params["lr"] and float(run.data.params["warmup"]) == t.params["warmup"]
        assert [s for s, _ in history(client, run.info.run_id, "loss")] == list(range(12))
        # Optuna's intermediate values are keyed by updates done; the tracker's step is the update's index.
        assert history(client, run.info.run_id, "val_loss") == [(s - 1, v) for s, v in
                                                                sorted(t.intermediate_values.items())]
        assert history(client, run.info.run_id, "objective") == [(11, t.value)]
    wandb_runs = {r["name"]: r for r in map(read_offline_run, offline_runs(out))}
    assert sorted(wandb_runs) == sorted(trials)
    for name, t in trials.items():
        run = wandb_runs[name]
        assert run["group"] == "quickstart" and run["config"]["lr"] == t.params["lr"]
        losses = [h["loss"] for h in run["history"] if "loss" in h]
        assert len(losses) == 12 and history(client, runs[name].info.run_id, "loss") == list(enumerate(losses))


# ---------------------------------------------------------------- checks: a tracker run per grid point

TRANSFER = """
[transfer]
axis = "width"
values = [32, 64]
parametrizations = ["mup"]
lr_log2_low = -9
lr_log2_high = -5
lr_log2_step = 2
seeds = 1
bootstrap = 0
[model]
preset = "tiny"
[train]
steps = 6
batch_size = 4
seq_len = 32
warmup = 0
eval_every = 3
eval_batches = 1
eval_batch_size = 4
"""


@pytest.mark.slow
def test_transfer_check_grid_points_are_tracker_runs(tmp_path, offline):
    path = tmp_path / "tiny_check.toml"
    path.write_text(TRANSFER)
    out = tmp_path / "check"
    assert main(["transfer-check", str(path), "--out", str(out), "--quiet", "--track", "tensorboard"]) in (0, 1)
    runs = read_jsonl(out / "runs.jsonl")
    assert len(runs) == 2 * 3 and {r["status"] for r in runs} == {"ok"}
    logdirs = {p.name: p for p in (out / "tensorboard").iterdir()}
    assert sorted(logdirs) == sorted(f"mup-width{r['value']}-lr2_{r['lr_log2']:g}-seed0" for r in runs)
    for r in runs:
        scalars = tb_scalars(logdirs[f"mup-width{r['value']}-lr2_{r['lr_log2']:g}-seed0"])
        assert [s for s, _ in scalars["loss"]] == list(range(6))
        assert same(scalars["val_loss"], [(s - 1, v) for s, v in r["val_losses"]], F32)
        assert scalars["events/outcome"] == [(5, 1.0)]
    # the definition of the check excludes the trackers: a re-run without them continues it
    assert main(["transfer-check", str(path), "--out", str(out), "--quiet"]) in (0, 1)
    assert len(read_jsonl(out / "runs.jsonl")) == len(runs)


def test_coord_check_runs_are_tracker_runs_and_untracked_writes_none(tmp_path, offline):
    args = ["coord-check", "tiny", "--widths", "64,128", "--steps", "3", "--seeds", "1", "--batch-size", "2",
            "--seq-len", "32", "--threads", "1"]
    out = tmp_path / "coord"
    assert main([*args, "--out", str(out), "--track", "mlflow", "--set", "tracking.project=coord"]) in (0, 1)
    records = pd.read_parquet(out / "coord.parquet")
    client, runs = mlflow_client(out), mlflow_runs(out, "coord")
    assert sorted(runs) == ["mup-width128-seed0", "mup-width64-seed0"]
    for width in (64, 128):
        run_id = runs[f"mup-width{width}-seed0"].info.run_id
        rec = records[records.width == width]
        loss = rec[rec.kind == "loss"].sort_values("step")
        assert history(client, run_id, "loss") == list(zip(loss.step, loss.value, strict=True))
        attn = rec[(rec.kind == "attn_out") & (rec.statistic == "l1")].groupby("step").value.mean()
        assert same(history(client, run_id, "l1/attn_out"), list(attn.items()), 1e-12)  # the same mean, reordered
        assert runs[f"mup-width{width}-seed0"].data.params["width"] == str(width)
    plain = tmp_path / "plain"
    assert main([*args, "--out", str(plain)]) in (0, 1)
    assert sorted(p.name for p in plain.iterdir()) == ["config.json", "coord.parquet", "coord.png", "environment.json",
                                                       "verdict.json"]
