"""The transfer verdict on every axis, on synthetic loss curves with a known optimum and known noise:
each axis's pass, fail and inconclusive branches, and bad axis values refused before compute.

The runs are written as ``mutransfer transfer-check`` writes them (runs.jsonl), and judged by the
same code the command calls (``proxy_sweeps.transfer_verdict.judge``); the reduced grids that train
for real are in test_transfer_check.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mutransfer.cli import main
from mutransfer.config import ConfigError
from proxy_sweeps.transfer import RUNS_FILE, spec_from_mapping
from proxy_sweeps.transfer_verdict import format_verdict, judge

TRAIN = {"steps": 16, "batch_size": 4, "seq_len": 32, "warmup": 2, "eval_every": 8, "eval_batches": 1,
         "eval_batch_size": 4}


def spec(axis: str, values: list[int], hparams: dict | None = None, **transfer):
    table = {"axis": axis, "values": values, "lr_log2_low": -10.0, "lr_log2_high": -2.0, "lr_log2_step": 1.0,
             "seeds": 4, "min_span": 2.0, **transfer}
    train = dict(TRAIN)
    if axis == "batch_size":
        table.setdefault("tokens", 4 * 32 * 64)
        train["micro_batch_size"] = 4
    return spec_from_mapping({"transfer": table, "model": {"preset": "tiny"}, "train": train,
                              "hparams": hparams or {}})


def write_runs(out, s, optimum, noise: float = 0.01, seed: int = 0, batches: int = 4,
               seed_optimum_sd: float = 0.0, crossed: bool = True) -> None:
    """Parabolic curves (0.03 nats per octave^2) around ``optimum(variant, value)``, plus per-seed and
    per-evaluation-batch noise of size ``noise``. ``seed_optimum_sd``: each seed's optimum is off by
    a draw of that sd (octaves), the same draw at every axis value (``crossed``, as a seed's
    initialisation and data are) or a fresh one per value."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, seed_optimum_sd, size=s.settings.seeds)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / RUNS_FILE, "w") as f:
        for v in s.variants:
            for value in s.settings.values:
                if not crossed:
                    offsets = rng.normal(0, seed_optimum_sd, size=s.settings.seeds)
                for sd in range(s.settings.seeds):
                    shift = rng.normal(0, noise)
                    for x in s.grid:
                        clean = 2.0 + 0.03 * (x - optimum(v.name, value) - offsets[sd]) ** 2 + shift
                        vals = list(clean + rng.normal(0, noise, size=batches))
                        f.write(json.dumps({"variant": v.name, "parametrization": v.parametrization,
                                            "value": value, "width": s.shape_at(v, value).model.d_model,
                                            s.settings.grid_key: x, "seed": sd, "status": "ok",
                                            "loss": float(np.mean(vals)), "val_batches": vals}) + "\n")


def verdict_for(tmp_path, axis, values, optimum, noise=0.01, hparams=None, **transfer):
    s = spec(axis, values, hparams, **transfer)
    write_runs(tmp_path, s, optimum, noise)
    return judge(tmp_path, s)


# --- width and depth: the drift of the optimum, with the SP control ------------------------------


@pytest.mark.parametrize("axis, values", [("width", [32, 64, 128, 256]), ("depth", [2, 4, 8, 16])])
def test_width_and_depth_pass_when_mup_stays_and_sp_drifts(tmp_path, axis, values):
    flat = lambda name, v: -6.0 if name.startswith("mup") else -6.0 - math.log2(v / values[0])  # noqa: E731
    v = verdict_for(tmp_path, axis, values, flat)
    assert v["outcome"] == "pass" and v["exit_status"] == 0, v["reasons"]
    drift = v["variants"]["mup"]["drift"]
    assert drift["ci"][0] <= 0 <= drift["ci"][1] and -0.5 < drift["ci"][0] and drift["ci"][1] < 0.5
    assert v["decision"]["control"]["outcome"] == "fail"  # SP's optimum moves 3 octaves: visibly


@pytest.mark.parametrize("axis, values", [("width", [32, 64, 128, 256]), ("depth", [2, 4, 8, 16])])
def test_width_and_depth_fail_when_the_optimum_drifts(tmp_path, axis, values):
    drifting = lambda name, v: -6.0 - 0.5 * math.log2(v / values[0])  # noqa: E731 -- 1.5 octaves over 8x
    v = verdict_for(tmp_path, axis, values, drifting)
    assert v["outcome"] == "fail" and v["exit_status"] == 1
    assert v["variants"]["mup"]["drift"]["ci"][1] < -0.5


def test_noise_comparable_to_the_goal_is_inconclusive_with_a_seed_estimate(tmp_path):
    halfway = lambda name, v: -6.0 - math.log2(v / 32) / 6 if name == "mup" else -6 - math.log2(v / 32)  # noqa
    v = verdict_for(tmp_path, "width", [32, 64, 128, 256], halfway, noise=0.02)
    assert v["outcome"] == "inconclusive" and v["exit_status"] == 3
    assert v["extra_seeds_needed"] is None or v["extra_seeds_needed"] > 0


@pytest.mark.parametrize("crossed", [True, False])
def test_a_seed_offset_common_to_every_width_moves_the_level_not_the_drift(tmp_path, crossed):
    """Each seed's optimum off by ~0.6 octave: every single optimum is uncertain. Shared by all widths
    (a seed is the same initialisation and data at every width), the offsets cancel in the drift and
    the check passes; drawn afresh per width they are real noise in it and it cannot decide."""
    s = spec("width", [32, 64, 128, 256])
    write_runs(tmp_path, s, lambda n, w: -6.0 if n == "mup" else -6.0 - math.log2(w / 32), noise=0.002,
               seed=1, seed_optimum_sd=0.6, crossed=crossed)
    v = judge(tmp_path, s)
    mup = v["variants"]["mup"]
    drift = mup["drift"]["ci"]
    if crossed:
        assert v["outcome"] == "pass", v["reasons"]
        assert drift[1] - drift[0] < 0.3
        assert min(p["ci"][1] - p["ci"][0] for p in mup["values"].values()) > 2 * (drift[1] - drift[0])
    else:
        assert v["outcome"] == "inconclusive", v["reasons"]
        assert drift[1] - drift[0] > 0.5


def test_depth_reports_every_exponent_and_judges_the_one_that_drifts_least(tmp_path):
    def opt(name, depth):
        return -6.0 if name == "mup(a=1)" else -6.0 - 0.6 * math.log2(depth / 2)

    v = verdict_for(tmp_path, "depth", [2, 4, 8, 16], opt, depth_alphas=[0.5, 1.0])
    assert set(v["variants"]) == {"mup(a=0.5)", "mup(a=1)", "sp"}
    assert v["primary"] == "mup(a=1)" and v["outcome"] == "pass"
    assert v["decision"]["by_variant"]["mup(a=0.5)"]["outcome"] == "fail"


def test_too_small_a_span_fails_whatever_the_noise(tmp_path):
    v = verdict_for(tmp_path, "width", [32, 64], lambda n, w: -6.0, min_span=8.0)
    assert v["outcome"] == "fail" and any("span" in r for r in v["reasons"])


def test_one_seed_is_inconclusive_not_a_crash(tmp_path):
    s = spec("width", [32, 64, 128, 256], seeds=1)
    write_runs(tmp_path, s, lambda n, w: -6.0)
    v = judge(tmp_path, s)
    assert v["outcome"] == "inconclusive" and "seed" in " ".join(v["reasons"])
    assert v["variants"]["mup"]["drift"]["estimate"] is not None  # the point estimate is still reported


# --- horizon and batch: a power law fitted on the smaller values predicts the largest -------------


def law(beta: float, values: list[int], bend_after: int | None = None):
    start = -4.0 if beta > 0 else -7.5  # inside the LR grid (2^-10 .. 2^-2) at every value
    def opt(name, v):
        x = start - beta * math.log2(v / values[0])
        if bend_after is not None and v > bend_after:  # the law breaks: the optimum stops moving
            x = start - beta * math.log2(bend_after / values[0])
        return x
    return opt


@pytest.mark.parametrize("axis, values", [("steps", [60, 120, 240, 480]), ("batch_size", [4, 8, 16, 32, 64])])
def test_a_law_that_holds_predicts_the_largest_value(tmp_path, axis, values):
    v = verdict_for(tmp_path, axis, values, law(0.5 if axis == "steps" else -0.5, values))
    assert v["outcome"] == "pass", v["reasons"]
    fit = v["law"]["law"]
    beta = 0.5 if axis == "steps" else -0.5
    assert fit["beta"]["ci"][0] <= beta <= fit["beta"]["ci"][1]
    residual = fit["residual"]
    assert residual["ci"][0] <= 0 <= residual["ci"][1]
    naive = v["law"]["naive_error"]["estimate"]  # keeping the proxy's LR is off by the whole drift
    assert abs(naive) == pytest.approx(abs(beta) * math.log2(values[-1] / values[0]), abs=0.3)


@pytest.mark.parametrize("axis, values", [("steps", [60, 120, 240, 480]), ("batch_size", [4, 8, 16, 32, 64])])
def test_a_law_that_breaks_fails_and_batch_names_the_critical_value(tmp_path, axis, values):
    sign = 1 if axis == "steps" else -1
    v = verdict_for(tmp_path, axis, values, law(sign * 0.8, values, bend_after=values[-2] // 2))
    assert v["outcome"] == "fail"
    if axis == "batch_size":
        assert v["law"]["critical"]["critical_value"] in values[-2:]


@pytest.mark.parametrize("shape", ["straight", "curved"])
def test_the_horizon_verdict_judges_the_law_shapes_on_the_held_out_horizon(tmp_path, shape):
    """mutransfer.law_forms on the check's own optima: a curved optimum (falling -0.2, -0.5, -0.8 octave
    per doubling) is caught and the curved law chosen; a straight one keeps the straight law."""
    values = [60, 120, 240, 480]
    bend = 0.15 if shape == "curved" else 0.0
    x = lambda t: math.log2(t / 60)  # noqa: E731
    v = verdict_for(tmp_path, "steps", values, lambda name, t: -5.0 - 0.3 * x(t) - bend * (x(t) ** 2 - x(t)))
    forms = v["law"]["forms"]
    assert forms["recommended"] == ("weighted" if shape == "curved" else "straight"), forms["reason"]
    assert ("curved" in forms["better"]) == (shape == "curved")
    assert set(forms["forms"]) == {"straight", "weighted", "curved"}
    assert "law shapes, held-out error at 480" in format_verdict(v)


def test_the_weighted_law_is_fitted_judged_and_carried_when_asked(tmp_path):
    """law_form = 'weighted': the check's law is the weighted fit (its residual decides), the lock entry
    says so, and the runs are the same (the form is not part of the directory's definition)."""
    values = [60, 120, 240, 480]
    x = lambda t: math.log2(t / 60)  # noqa: E731
    v = verdict_for(tmp_path, "steps", values, lambda name, t: -5.0 - 0.3 * x(t) - 0.15 * (x(t) ** 2 - x(t)),
                    law_form="weighted")
    fit = v["law"]["law"]
    assert fit["form"] == "weighted" and v["law"]["forms"]["configured"] == "weighted"
    assert fit["residual"]["estimate"] == pytest.approx(v["law"]["forms"]["forms"]["weighted"]["residual"])
    assert "power law (weighted least squares) fitted below 480" in format_verdict(v)
    from mutransfer.laws import law_from_verdict

    config = {"spec": {"train": {"seq_len": 32, "batch_size": 4}, "model": {"preset": "tiny"}}}
    assert law_from_verdict(v, config, str(tmp_path))["form"] == "weighted"
    with pytest.raises(ConfigError, match=re.escape("law_form = 'weighted': a law's form applies to the steps")):
        spec("width", [32, 64, 128], law_form="weighted")
    assert spec("batch_size", [4, 8, 16], law_form="weighted").settings.law_form == "weighted"


# --- weight decay along the horizon: the timescale rule (lambda eta T constant) against a free fit ----


WD = {"tune": "weight_decay", "wd_log2_low": -8.0, "wd_log2_high": 2.0, "wd_log2_step": 1.0}


def test_weight_decay_that_follows_the_timescale_rule_passes(tmp_path):
    values = [60, 120, 240, 480]
    timescale = lambda name, v: -1.0 - math.log2(v / values[0])  # noqa: E731 -- lambda* ~ 1/T at a fixed LR
    v = verdict_for(tmp_path, "steps", values, timescale, hparams={"lr": 0.01}, **WD)
    assert v["tune"] == "weight_decay" and v["grid_key"] == "wd_log2"
    assert v["outcome"] == "pass", v["reasons"]
    assert "timescale rule" in v["reasons"][0]
    rule, free = v["law"]["timescale"], v["law"]["law"]
    assert rule["beta"]["estimate"] == 1.0 and rule["residual"]["ci"][0] <= 0 <= rule["residual"]["ci"][1]
    assert free["beta"]["ci"][0] <= 1.0 <= free["beta"]["ci"][1]  # the free fit finds the same exponent
    assert v["law"]["naive_error"]["estimate"] == pytest.approx(-3.0, abs=0.3)  # keeping lambda: 3 octaves off
    assert v["variants"]["mup"]["values"]["480"]["wd_log2"] == pytest.approx(-4.0, abs=0.2)


def test_weight_decay_that_stays_put_fails_the_timescale_rule(tmp_path):
    v = verdict_for(tmp_path, "steps", [60, 120, 240, 480], lambda name, v: -3.0, hparams={"lr": 0.01}, **WD)
    assert v["outcome"] == "fail"
    # the rule through 60..240 centres on 120, so it falls 2 octaves below the flat optimum at 480
    assert v["law"]["timescale"]["residual"]["estimate"] == pytest.approx(2.0, abs=0.3)
    free = v["law"]["law"]["residual"]  # the free fit (beta ~ 0) still predicts it: reported beside
    assert free["ci"][0] <= 0 <= free["ci"][1]

    assert "timescale rule (lambda eta T constant)" in format_verdict(v)


def test_a_weight_decay_verdict_is_drawn_and_reported_as_weight_decay(tmp_path):
    from analysis.report_document import Section, render_markdown
    from analysis.report_transfer import verdict_blocks
    from analysis.transfer import draw

    values = [60, 120, 240, 480]
    s = spec("steps", values, hparams={"lr": 0.01}, **WD)
    write_runs(tmp_path, s, lambda name, v: -1.0 - math.log2(v / 60))
    v = judge(tmp_path, s)
    assert draw(tmp_path).stat().st_size > 0
    text = render_markdown([Section("t", "t", verdict_blocks(v, seeds=4))], "t", "", "img", {})
    assert "optimum weight decay, steps 480" in text and "2^-4.0" in text
    assert "timescale rule's residual (octaves)" in text and "| timescale rule within +-0.35 octave | PASS |" in text
    assert "optimum LR" not in text


def test_a_weight_decay_check_needs_a_fixed_lr_and_carries_no_lr_law(tmp_path):
    from mutransfer.laws import law_from_verdict

    with pytest.raises(ConfigError, match=re.escape("hparams.lr: transfer.tune = 'weight_decay' holds")):
        spec("steps", [60, 120, 240], **WD)
    with pytest.raises(ConfigError, match=re.escape("hparams.weight_decay: the weight decay is the grid's")):
        spec("steps", [60, 120, 240], hparams={"lr": 0.01, "weight_decay": 0.1}, **WD)
    with pytest.raises(ConfigError, match=re.escape("wd_log2_low = 2.0 must be below wd_log2_high = -8.0")):
        spec("steps", [60, 120, 240], hparams={"lr": 0.01}, **{**WD, "wd_log2_low": 2.0, "wd_log2_high": -8.0})
    values = [60, 120, 240, 480]
    s = spec("steps", values, hparams={"lr": 0.01}, **WD)
    write_runs(tmp_path, s, lambda name, v: -1.0 - math.log2(v / 60))
    with pytest.raises(ConfigError, match="carries no LR law"):
        law_from_verdict(judge(tmp_path, s), {"spec": s.raw}, "wd")


# --- bad axis values: refused before compute, naming the field -----------------------------------


@pytest.mark.parametrize("axis, values, extra, message", [
    ("depth", [0, 4], {}, "transfer.values[0]: input should be greater than 0"),
    ("steps", [1, 60, 120], {}, "warmup = 2 + decay = 0 must fit in steps = 1"),
    ("batch_size", [4, 6, 8], {"tokens": 4 * 32 * 24}, "does not divide into micro-batches"),
    ("batch_size", [4, 8, 16], {"tokens": 1000}, "not a whole number of steps"),
    ("steps", [60, 120], {}, "give at least three"),
    ("width", [32, 64], {"lr_log2_step": math.nan}, "transfer.lr_log2_step: input should be a finite number"),
])
def test_bad_axis_values_fail_before_compute(tmp_path, capsys, axis, values, extra, message):
    table = {"axis": axis, "values": values, **extra}
    train = dict(TRAIN)
    if axis == "batch_size":
        train["micro_batch_size"] = 4
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_from_mapping({"transfer": table, "model": {"preset": "tiny"}, "train": train})
    path = tmp_path / "t.toml"
    lines = [f"[transfer]\naxis = '{axis}'\nvalues = {values}"]
    lines += [f"{k} = {v if not isinstance(v, float) or math.isfinite(v) else 'nan'}" for k, v in extra.items()]
    lines += ["[model]\npreset = 'tiny'", "[train]"] + [f"{k} = {v}" for k, v in train.items()]
    path.write_text("\n".join(lines) + "\n")
    assert main(["transfer-check", str(path), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# --- carrying a fitted law: freeze attaches it, plan shows it, a config applies it on demand -------


def test_a_fitted_horizon_law_corrects_the_target_lr_only_when_asked(tmp_path, capsys):
    from full_scale.config import load_run_config
    from mutransfer.config import HParams
    from mutransfer.laws import law_from_verdict
    from mutransfer.lockfile import write_lock
    from mutransfer.presets import get_preset

    values = [60, 120, 240, 480]
    s = spec("steps", values)
    write_runs(tmp_path / "horizon", s, law(0.5, values))
    verdict = judge(tmp_path / "horizon", s)
    law_entry = law_from_verdict(verdict, {"spec": s.raw}, "horizon")
    assert law_entry["kind"] == "horizon" and law_entry["beta"] == pytest.approx(0.5, abs=0.1)
    tiny = get_preset("tiny")
    proxy_train = {"steps": 120, "batch_size": 8, "seq_len": 128}  # the sweep's trials: 122,880 tokens
    lock = tmp_path / "lock.json"
    write_lock(lock, HParams(lr=0.01, alpha_in=4.0), tiny.param, tiny.model, {"proxy_train": proxy_train},
               laws={"horizon": law_entry})
    smoke = str(Path(__file__).resolve().parents[1] / "full_scale" / "smoke.toml")
    off = load_run_config(smoke, [], str(lock))
    assert off.hp.lr == 0.01 and off.lr_correction["factor"] == 1.0  # the lock's value unless asked
    on = load_run_config(smoke, ["transfer.horizon='fitted'"], str(lock))
    expected = 2.0 ** (-law_entry["beta"] * math.log2(on.stages.total_tokens / (120 * 8 * 128)))
    assert on.lr_correction["factor"] == pytest.approx(expected)
    assert on.hp.lr == pytest.approx(0.01 * expected)
    assert main(["plan", smoke, "--hparams", str(lock), "--set", "transfer.horizon='fitted'"]) == 0
    out = capsys.readouterr().out
    assert "corrected by the fitted laws (horizon x" in out
    with pytest.raises(ConfigError, match="no batch law"):
        load_run_config(smoke, ["transfer.batch='fitted'"], str(lock))
