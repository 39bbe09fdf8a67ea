"""The joint check (a transfer-check file with a [target] table): the proxy's LR, muP and the fitted
laws predict the optimum of a target that differs on every axis.

The verdict's branches on synthetic loss curves (parabolas with a known optimum, written as the
command writes runs.jsonl, judged by the code the command calls), the ablation rows, the refusals
before compute, and a reduced grid that trains for real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mutransfer.cli import main
from mutransfer.config import ConfigError, HParams
from mutransfer.laws import law_from_verdict
from mutransfer.lockfile import write_lock
from mutransfer.presets import get_preset
from proxy_sweeps import transfer
from proxy_sweeps.joint import PROXY, TARGET, JointSpec, judge, load_joint_spec, prediction_rows, spec_from_mapping
from proxy_sweeps.transfer import RUNS_FILE, read_runs
from proxy_sweeps.transfer_verdict import judge as judge_axis

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"steps": 16, "batch_size": 4, "seq_len": 32, "warmup": 2, "eval_every": 64, "eval_batches": 1,
         "eval_batch_size": 4}
# The laws the synthetic checks below fit (exactly, up to their noise): the optimum falls half an
# octave per doubling of the horizon and rises half an octave per doubling of the batch.
HORIZON_BETA, BATCH_BETA = 0.5, -0.5
# Proxy 16 steps x batch 4, target 64 steps x batch 8: 8x the tokens, 2x the batch, so the horizon
# law moves the optimum by -0.5 x 3 = -1.5 octaves and the batch law by +0.5: -1.0 in all.
PROXY_POINT = {"width": 32, "depth": 2, "steps": 16, "batch_size": 4}
TARGET_POINT = {"width": 64, "depth": 4, "steps": 64, "batch_size": 8}
PROXY_OPT = -6.0
PREDICTED = PROXY_OPT - 1.5 + 0.5


def parabolas(rng, xs, optimum, seeds, noise, batches=4):
    """Per seed: losses at xs, 0.03 nats per octave^2 around ``optimum``, a per-seed level shift and
    per-evaluation-batch noise of size ``noise`` (as tests/test_transfer_axes.py)."""
    for sd in range(seeds):
        shift = rng.normal(0, noise)
        for x in xs:
            vals = list(2.0 + 0.03 * (x - optimum) ** 2 + shift + rng.normal(0, noise, size=batches))
            yield sd, x, vals


def law_dir(tmp_path, axis: str, beta: float, noise: float = 0.002) -> str:
    """A transfer-check directory along ``axis`` whose runs follow log2 LR* = -6 - beta log2(value / v0)."""
    values = [16, 32, 64, 128] if axis == "steps" else [4, 8, 16, 32]
    table = {"axis": axis, "values": values, "lr_log2_low": -10.0, "lr_log2_high": -2.0, "lr_log2_step": 1.0,
             "seeds": 4, "parametrizations": ["mup"]}
    train = dict(TRAIN)
    if axis == "batch_size":
        table["tokens"] = 4 * 32 * 64
        train["micro_batch_size"] = 4
    raw = {"transfer": table, "model": {"preset": "tiny"}, "train": train}
    s = transfer.spec_from_mapping(raw)
    out = tmp_path / f"{axis}-{noise:g}"
    out.mkdir()
    rng = np.random.default_rng(7)
    with open(out / RUNS_FILE, "w") as f:
        for v in values:
            opt = -6.0 - beta * math.log2(v / values[0])
            for sd, x, vals in parabolas(rng, s.grid, opt, 4, noise):
                f.write(json.dumps({"variant": "mup", "parametrization": "mup", "value": v, "lr_log2": x, "seed": sd,
                                    "status": "ok", "loss": float(np.mean(vals)), "val_batches": vals}) + "\n")
    judge_axis(out, s)
    (out / "config.json").write_text(json.dumps({"spec": raw}))  # what transfer-check writes beside it
    return str(out)


@pytest.fixture(scope="module")
def laws(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("laws")
    return [law_dir(tmp, "steps", HORIZON_BETA), law_dir(tmp, "batch_size", BATCH_BETA)]


def joint_raw(laws=(), lock=None, seeds=4, proxy=True, **joint) -> dict:
    table = {"lr_log2_low": -10.0, "lr_log2_high": -3.0, "lr_log2_step": 0.5, "seeds": seeds, "laws": list(laws),
             **joint}
    if lock:
        table["lock"] = str(lock)
    raw = {"joint": table, "target": dict(TARGET_POINT), "model": {"preset": "tiny"}, "param": {"depth_alpha": 1.0},
           "train": dict(TRAIN)}
    if proxy:
        raw["proxy"] = dict(PROXY_POINT)
    return raw


def write_sides(out: Path, spec: JointSpec, optima: dict[int, float], noise: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / RUNS_FILE, "w") as f:
        for side in spec.sides:
            for sd, x, vals in parabolas(rng, spec.grid_of(side), optima[side], spec.settings.seeds, noise):
                f.write(json.dumps({"variant": "mup", "parametrization": "mup", "axis": "joint", "value": side,
                                    "lr_log2": x, "seed": sd, "status": "ok", "loss": float(np.mean(vals)),
                                    "val_batches": vals}) + "\n")


def verdict_for(tmp_path, target_opt: float, noise: float = 0.002, **kw) -> dict:
    spec = spec_from_mapping(joint_raw(**kw))
    write_sides(tmp_path / "out", spec, {PROXY: PROXY_OPT, TARGET: target_opt}, noise)
    return judge(tmp_path / "out", spec)


def rows(verdict: dict) -> dict[str, dict]:
    return {r["name"]: r for r in verdict["predictions"]}


# --- the verdict's branches ------------------------------------------------------------------------


def test_a_target_where_the_laws_predict_passes_and_each_law_alone_does_not(tmp_path, laws):
    v = verdict_for(tmp_path, PREDICTED, laws=laws)
    assert v["outcome"] == "pass" and v["exit_status"] == 0, v["reasons"]
    assert v["laws"]["horizon"]["octaves"] == pytest.approx(-1.5, abs=0.05)  # beta 0.5 x log2(8 x tokens)
    assert v["laws"]["batch"]["octaves"] == pytest.approx(0.5, abs=0.05)  # beta -0.5 x log2(2 x batch)
    r = rows(v)
    assert list(r) == ["muP alone", "+ horizon law", "+ batch law", "all laws (horizon + batch)"]
    full = r["all laws (horizon + batch)"]
    assert full["predicted_lr_log2"] == pytest.approx(PREDICTED, abs=0.1)
    lo, hi = full["error"]["ci"]
    assert -0.35 < lo <= 0 <= hi < 0.35
    # each ablation is off by what it leaves out: muP alone -1.0, horizon alone +0.5, batch alone -1.5
    for name, off in (("muP alone", -1.0), ("+ horizon law", 0.5), ("+ batch law", -1.5)):
        assert r[name]["error"]["estimate"] == pytest.approx(off, abs=0.1), name
        assert r[name]["outcome"] == "fail", name
    assert v["proxy"]["source"] == "measured" and v["proxy"]["ci"] is not None
    assert v["target"]["width"] == 64 and v["target"]["tokens"] == 64 * 8 * 32


def test_a_target_far_from_the_prediction_fails(tmp_path, laws):
    v = verdict_for(tmp_path, PREDICTED + 1.5, laws=laws)
    assert v["outcome"] == "fail" and v["exit_status"] == 1, v["reasons"]
    assert rows(v)["all laws (horizon + batch)"]["error"]["ci"][0] > 0.35
    assert rows(v)["+ batch law"]["outcome"] == "pass"  # here the batch law alone would have done


def test_the_laws_noise_is_in_the_error_interval(tmp_path):
    """Laws fitted on noisy checks: the target's optimum is sharp and sits at the prediction, so the
    optima alone would pass, but the laws' beta draws (carried over 3 doublings of tokens and 1 of batch)
    widen the interval past the goal: inconclusive, and the reason says whose seeds would narrow it."""
    noisy = [law_dir(tmp_path, "steps", HORIZON_BETA, noise=0.06), law_dir(tmp_path, "batch_size", BATCH_BETA, 0.06)]
    v = verdict_for(tmp_path, PREDICTED, laws=noisy)
    full = rows(v)["all laws (horizon + batch)"]
    lo, hi = full["error"]["ci"]
    o_lo, o_hi = full["error"]["optima_only_ci"]
    assert -0.35 < o_lo and o_hi < 0.35  # the optima alone: inside the goal
    assert hi - lo > 2 * (o_hi - o_lo) and (lo < -0.35 or hi > 0.35)
    assert v["outcome"] == "inconclusive" and "seeds of the checks they were fitted on" in v["reasons"][0]
    assert rows(v)["muP alone"]["error"]["optima_only_ci"] is None  # no law, no law noise
    assert v["laws"]["horizon"]["draws_source"].endswith("bootstrap draws of the check")


def test_a_noisy_target_straddling_the_goal_is_inconclusive(tmp_path, laws):
    v = verdict_for(tmp_path, PREDICTED + 0.3, noise=0.03, laws=laws)
    assert v["outcome"] == "inconclusive" and v["exit_status"] == 3, v["reasons"]
    lo, hi = rows(v)["all laws (horizon + batch)"]["error"]["ci"]
    assert lo < 0.35 < hi  # straddles the goal's edge


def test_an_optimum_at_the_grid_edge_is_inconclusive(tmp_path, laws):
    v = verdict_for(tmp_path, -10.5, laws=laws)  # below the target's grid
    assert v["outcome"] == "inconclusive" and "target optimum" in " ".join(v["reasons"])


def test_one_seed_is_inconclusive_not_a_crash(tmp_path, laws):
    v = verdict_for(tmp_path, PREDICTED, laws=laws, seeds=1)
    assert v["outcome"] == "inconclusive" and "seed" in " ".join(v["reasons"])
    assert rows(v)["all laws (horizon + batch)"]["error"]["estimate"] == pytest.approx(0.0, abs=0.1)


def test_without_laws_the_prediction_is_mups_alone(tmp_path):
    v = verdict_for(tmp_path, PROXY_OPT)
    assert [r["name"] for r in v["predictions"]] == ["muP alone"]
    assert v["outcome"] == "pass" and any("no law" in r for r in v["reasons"])
    assert prediction_rows(["horizon"]) == [("muP alone", []), ("all laws (horizon)", ["horizon"])]


def test_the_report_shows_the_joint_verdict_and_the_ablation(tmp_path, laws):
    from analysis.joint import draw
    from analysis.report import write_report

    verdict_for(tmp_path, PREDICTED, laws=laws)
    draw(tmp_path / "out")
    written = write_report([str(tmp_path / "out")], tmp_path / "report.html")
    text = written["markdown"].read_text()
    assert "Joint verdict: PASS" in text and "all laws (horizon + batch)" in text and "muP alone" in text
    assert "error's interval from the optima alone" in text and "the same (no law noise)" in text
    assert written["images"] == 1 and not written["notes"]  # joint.png shown; not read as a single-axis check


# --- the proxy's LR and laws from a lock -----------------------------------------------------------


def lock_file(tmp_path, laws, proxy_train=True, name="lock.json") -> Path:
    tiny = get_preset("tiny")
    param = tiny.param.model_copy(update={"depth_alpha": 1.0})
    entries = {}
    for d in laws:
        entry = law_from_verdict(json.loads(Path(d, "verdict.json").read_text()),
                                 json.loads(Path(d, "config.json").read_text()), d)
        entries[entry["kind"]] = entry
    prov = {"proxy_train": {"steps": 16, "batch_size": 4, "seq_len": 32, "warmup": 2}} if proxy_train else {}
    path = tmp_path / name
    write_lock(path, HParams(lr=2.0**PROXY_OPT), param, tiny.model, prov, laws=entries)
    return path


def test_a_lock_gives_the_proxys_lr_and_laws_and_only_the_target_trains(tmp_path, laws):
    lock = lock_file(tmp_path, laws)
    spec = spec_from_mapping(joint_raw(lock=lock, proxy=False))
    assert spec.sides == [TARGET]
    write_sides(tmp_path / "out", spec, {TARGET: PREDICTED}, 0.002)
    v = judge(tmp_path / "out", spec)
    assert v["outcome"] == "pass", v["reasons"]
    assert v["proxy"]["lr_log2"] == pytest.approx(PROXY_OPT) and v["proxy"]["source"].startswith("lock")
    assert rows(v)["muP alone"]["error"]["estimate"] == pytest.approx(-1.0, abs=0.1)
    spec_far = spec_from_mapping(joint_raw(lock=lock, proxy=False))
    write_sides(tmp_path / "far", spec_far, {TARGET: PREDICTED - 1.2}, 0.002)
    assert judge(tmp_path / "far", spec_far)["outcome"] == "fail"


@pytest.mark.parametrize("change, message", [
    ({"proxy": True}, "proxy: joint.lock names the proxy"),
    ({"hparams": {"weight_decay": 0.1}}, "hparams: joint.lock holds"),
    ({"proxy_lr_log2_low": -8.0}, "joint.proxy_lr_log2_low"),
    ({"param": {"depth_alpha": 0.5}}, "param.depth_alpha"),
])
def test_a_lock_refuses_what_would_contradict_it(tmp_path, laws, change, message):
    lock = lock_file(tmp_path, laws)
    raw = joint_raw(lock=lock, proxy=change.pop("proxy", False), **{k: v for k, v in change.items()
                                                                     if k.startswith("proxy_lr")})
    raw.update({k: v for k, v in change.items() if not k.startswith("proxy_lr")})
    with pytest.raises(ConfigError, match=message):
        spec_from_mapping(raw)


def test_laws_that_cannot_scale_or_come_twice_are_refused_before_compute(tmp_path, laws):
    from proxy_sweeps.joint import law_terms, read_laws

    no_budget = spec_from_mapping(joint_raw(lock=lock_file(tmp_path, laws, proxy_train=False), proxy=False))
    with pytest.raises(ConfigError, match="proxy_train"):
        law_terms(no_budget, read_laws(no_budget))
    twice = spec_from_mapping(joint_raw(laws=laws[:1], lock=lock_file(tmp_path, laws, name="l2.json"),
                                                 proxy=False))
    with pytest.raises(ConfigError, match="joint.laws: .* gives a horizon law, and the lock has one"):
        read_laws(twice)
    ok = spec_from_mapping(joint_raw(laws=laws))
    assert set(law_terms(ok, read_laws(ok))) == {"horizon", "batch"}


def _without_target(raw):
    raw.pop("target")


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.update(hparams={"lr": 0.01}), "hparams.lr"),
    (lambda raw: raw["joint"].update(lr_log2_low=-3.0, lr_log2_high=-5.0), "lr_log2_low"),
    (_without_target, "target: a joint check needs a"),
    (lambda raw: raw["target"].update(width=40), "40"),
    (lambda raw: raw["train"].update(micro_batch_size=4) or raw["proxy"].update(batch_size=6), "proxy"),
    (lambda raw: raw.update(sweep={}), "unknown table"),
])
def test_bad_joint_files_name_the_field(edit, message):
    raw = joint_raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        spec_from_mapping(raw)


def test_the_single_axis_reader_points_a_joint_file_to_the_joint_check():
    with pytest.raises(ConfigError, match="joint check"):
        transfer.spec_from_mapping(joint_raw())
    assert transfer.spec_from_mapping({"transfer": {"values": [32, 64]}, "model": {"preset": "tiny"}})


def test_the_shipped_joint_file_parses_and_differs_on_every_axis():
    spec = load_joint_spec(ROOT / "proxy_sweeps" / "joint_tiny.toml")
    assert isinstance(spec, JointSpec) and spec.measured_proxy
    p, t = spec.describe(PROXY), spec.describe(TARGET)
    assert (p["width"], p["depth"], p["steps"], p["batch_size"]) == (32, 2, 120, 8)
    assert (t["width"], t["depth"], t["steps"], t["batch_size"]) == (128, 4, 480, 16)
    assert len(spec.grid_of(TARGET)) == 7 and spec.settings.seeds == 3
    assert spec.shape.param.depth_alpha == 1.0  # the exponent the depth check passed with


def test_missing_law_directories_exit_2_before_compute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the shipped file names runs/horizon and runs/batch, absent here
    out = tmp_path / "out"
    assert main(["transfer-check", str(ROOT / "proxy_sweeps" / "joint_tiny.toml"), "--out", str(out)]) == 2
    assert "runs/horizon" in capsys.readouterr().err and not out.exists()


# --- a reduced grid that trains ---------------------------------------------------------------------


REDUCED = """
[joint]
laws = {laws}
lr_log2_low = -8
lr_log2_high = -4
lr_log2_step = 2
seeds = 2
bootstrap = 200
[proxy]
width = 16
depth = 2
steps = 12
batch_size = 2
[target]
width = 32
depth = 3
steps = 24
batch_size = 4
[model]
preset = "tiny"
[param]
depth_alpha = 1.0
[train]
steps = 12
warmup = 1
seq_len = 32
eval_every = 64
eval_batches = 2
eval_batch_size = 4
"""


@pytest.mark.slow
def test_a_reduced_joint_check_trains_both_sides_and_writes_the_ablation(tmp_path, laws, capsys):
    path = tmp_path / "joint.toml"
    path.write_text(REDUCED.format(laws=json.dumps(laws)))
    out = tmp_path / "out"
    rc = main(["transfer-check", str(path), "--out", str(out), "--workers", "2"])
    runs = read_runs(out)
    assert len(runs) == 2 * 3 * 2 and {r["status"] for r in runs} <= {"ok", "diverged"}
    by_side = {side: {(r["width"], r["depth"], r["steps"], r["batch_size"]) for r in runs if r["value"] == side}
               for side in (PROXY, TARGET)}
    assert by_side == {PROXY: {(16, 2, 12, 2)}, TARGET: {(32, 3, 24, 4)}}
    verdict = json.loads((out / "verdict.json").read_text())
    assert rc == verdict["exit_status"] and verdict["outcome"] in ("pass", "fail", "inconclusive")
    assert [r["name"] for r in verdict["predictions"]] == ["muP alone", "+ horizon law", "+ batch law",
                                                           "all laws (horizon + batch)"]
    assert all(r["error"]["estimate"] is not None for r in verdict["predictions"])
    assert (out / "joint.png").stat().st_size > 0
    err = capsys.readouterr().err
    assert "joint check" in err and "verdict:" in err
    # Re-running continues: nothing is trained again; more seeds add only their runs.
    assert main(["transfer-check", str(path), "--out", str(out), "--quiet"]) == rc
    assert len(read_runs(out)) == len(runs)
