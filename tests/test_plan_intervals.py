"""Intervals at the target: the fitted laws' bootstrap draws carried from the transfer check's
verdict through ``freeze --law`` into the lock, and ``plan`` giving every transferred LR a 90 %
interval, each law's extrapolation past its data, and warnings (also on ``train``'s stderr) when a
law is carried past ``EXTRAPOLATION_LIMIT`` or its check did not pass.

The check's runs are synthetic (parabolic loss curves around a known power law, judged by the same
code ``transfer-check`` calls), so no model is trained except in the two short ``train`` runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mutransfer.cli import main
from mutransfer.config import HParams, ProxyTrain
from mutransfer.laws import (
    EXTRAPOLATION_LIMIT,
    Law,
    Laws,
    TransferCorrection,
    correction,
    law_from_verdict,
)
from mutransfer.lockfile import read_lock, write_lock
from mutransfer.presets import get_preset
from proxy_sweeps.transfer_verdict import LAW_DRAWS, judge
from tests.test_transfer_axes import law, spec, write_runs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "full_scale" / "smoke.toml")
PROXY_TRAIN = {"steps": 120, "batch_size": 8, "seq_len": 128}  # the sweep's trials: 122,880 tokens
VALUES = [60, 120, 240, 480]  # steps of the synthetic horizon check (4 sequences of 32 tokens a step)
# The smoke run in 11 steps (tests/test_faults_lock.py): seconds on CPU.
SHORT = ["--set", "stages.warmup.steps=2", "--set", "stages.stable1.steps=2", "--set", "stages.stable2.steps=2",
         "--set", "stages.decay.steps=3", "--set", "stages.long_context.phases.0.steps=1",
         "--set", "stages.long_context.phases.1.steps=1", "--set", "train.eval_every=4"]


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile by hand: sort, then interpolate linearly between neighbouring ranks."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


@pytest.fixture(scope="module")
def horizon_check(tmp_path_factory) -> tuple[dict, dict]:
    """A judged horizon check (verdict, config) whose optimum falls 0.5 octave per doubling of steps."""
    out = tmp_path_factory.mktemp("horizon")
    s = spec("steps", VALUES)
    write_runs(out, s, law(0.5, VALUES))
    verdict = judge(out, s)
    (out / "config.json").write_text(json.dumps({"spec": s.raw}))
    return verdict, {"spec": s.raw}


def lock_with(tmp_path: Path, laws: dict, name: str = "lock.json") -> Path:
    tiny = get_preset("tiny")
    path = tmp_path / name
    write_lock(path, HParams(lr=0.01, alpha_in=4.0), tiny.param, tiny.model, {"proxy_train": PROXY_TRAIN}, laws=laws)
    return path


def plan_json(capsys, lock: Path, *sets: str) -> dict:
    args = [a for s in sets for a in ("--set", s)]
    assert main(["plan", SMOKE, "--hparams", str(lock), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def synthetic_law(kind: str, beta: float, draws: list[float] | None, fitted_on: list[float],
                  outcome: str = "pass", tokens_per_step: int = 128) -> Law:
    """A law as the lock types it, with chosen beta draws (a's draws do not enter the correction)."""
    unit, axis_unit = ("tokens", "steps") if kind == "horizon" else ("sequences", "sequences per step")
    return Law(kind=kind, unit=unit, beta=beta, beta_ci=[beta - 0.1, beta + 0.1], a=-3.0, fitted_on=fitted_on,
               outcome=outcome, axis_unit=axis_unit, source=kind,
               tokens_per_step=tokens_per_step if kind == "horizon" else None,
               draws=None if draws is None else {"a": [-3.0] * len(draws), "beta": draws})


# ---------------------------------------------------------------- the draws travel: verdict -> lock


def test_the_check_keeps_its_draws_and_freeze_carries_them_into_the_lock(tmp_path, horizon_check):
    verdict, config = horizon_check
    draws = verdict["law"]["law"]["draws"]
    assert len(draws["a"]) == len(draws["beta"]) == LAW_DRAWS
    # the draws are those the interval on beta was read from: their percentiles give it back (400 of
    # the 1000 draws and 4 significant digits: a few hundredths of the interval's width, 0.02 of beta)
    ci = verdict["law"]["law"]["beta"]["ci"]
    assert percentile(draws["beta"], 0.05) == pytest.approx(ci[0], abs=0.02)
    assert percentile(draws["beta"], 0.95) == pytest.approx(ci[1], abs=0.02)
    entry = law_from_verdict(verdict, config, "horizon")
    lock = read_lock(lock_with(tmp_path, {"horizon": entry}))
    kept = lock.laws.horizon.draws
    assert kept.beta == draws["beta"]
    # a moves to tokens as the point estimate does: a + beta log2(tokens per step), draw by draw (to the
    # 4 significant digits a draw is kept at: 1e-3 on an a of about -3)
    shift = math.log2(4 * 32)
    assert kept.a == pytest.approx([a + b * shift for a, b in zip(draws["a"], draws["beta"], strict=True)],
                                   abs=1e-3)
    assert lock.laws.horizon.model_params > 0  # the check's model (tiny), for tokens per parameter


def test_freeze_law_carries_the_draws_into_the_lock(tmp_path, capsys, horizon_check):
    from tests.test_faults_lock import INSIDE, write_sweep

    verdict, config = horizon_check
    check = tmp_path / "horizon"
    check.mkdir()
    (check / "verdict.json").write_text(json.dumps(verdict))
    (check / "config.json").write_text(json.dumps(config))
    out = tmp_path / "hparams.lock.json"
    assert main(["freeze", str(write_sweep(tmp_path / "sweep", INSIDE)), "--out", str(out), "--law", str(check)]) == 0
    assert "warning:" not in capsys.readouterr().err
    law_ = read_lock(out).laws.horizon
    assert law_.draws.beta == verdict["law"]["law"]["draws"]["beta"] and law_.model_params > 0


def test_a_lock_refuses_draws_that_are_not_pairs(tmp_path, horizon_check):
    from mutransfer.config import ConfigError

    entry = law_from_verdict(*horizon_check, "horizon")
    entry["draws"]["a"] = entry["draws"]["a"][:-1]
    with pytest.raises(ConfigError, match="laws.horizon.draws"):
        lock_with(tmp_path, {"horizon": entry})


# ---------------------------------------------------------------- plan: an interval for every transferred value


def test_plan_json_gives_every_transferred_value_an_interval(tmp_path, capsys, horizon_check):
    lock = lock_with(tmp_path, {"horizon": law_from_verdict(*horizon_check, "horizon")})
    plan = plan_json(capsys, lock, "transfer.horizon='fitted'")
    lr = plan["lr_transfer"]
    fix = lr["correction"]
    lo, hi = fix["interval_90"]
    assert lo < fix["factor"] < hi
    assert fix["interval"]["sources"] == {"horizon": f"{LAW_DRAWS} bootstrap draws of the check"}
    assert len(lr["groups"]) > 5
    for g in lr["groups"]:
        g_lo, g_hi = g["lr_interval_90"]
        assert g_lo < g["corrected_lr"] < g_hi
        # each group's LR is the base LR times its muP multiplier: its interval is the factor's
        assert g_lo == pytest.approx(g["target_lr"] * lo) and g_hi == pytest.approx(g["target_lr"] * hi)
        assert g["weight_decay_by_law"] is False
    wd = lr["weight_decay"]
    assert wd["transferred_by_law"] is False and "not transferred by a law" in wd["note"]
    term = fix["terms"]["horizon"]
    tokens = term["target"]
    assert term["largest_fitted"] == 240 * 128  # the largest value fitted on (480 was held out)
    assert term["extrapolation"] == pytest.approx(tokens / (240 * 128))
    tpp = term["tokens_per_parameter"]
    assert tpp["target"] == pytest.approx(tokens / plan["params_total"])
    params = read_lock(lock).laws.horizon.model_params
    assert tpp["fitted_range"] == pytest.approx([60 * 128 / params, 240 * 128 / params])
    assert plan["warnings"] == []  # 2.8x past the data, a passed check


def test_plan_text_shows_the_interval_and_the_extrapolation(tmp_path, capsys, horizon_check):
    lock = lock_with(tmp_path, {"horizon": law_from_verdict(*horizon_check, "horizon")})
    assert main(["plan", SMOKE, "--hparams", str(lock), "--set", "transfer.horizon='fitted'"]) == 0
    out = capsys.readouterr().out
    assert "90 % interval" in out and "extrapolation of the horizon law: x2.8" in out
    assert "weight decay is not transferred by a law" in out and "warning:" not in out


def test_the_interval_is_the_percentiles_of_the_corrected_factor_over_the_draws():
    """Two laws, chosen draws: the interval equals the 5th/95th percentiles computed here by hand over
    every pair of draws (the two checks are independent)."""
    rng = np.random.default_rng(0)
    h_draws = [round(float(b), 4) for b in rng.normal(0.4, 0.05, 60)]
    b_draws = [round(float(b), 4) for b in rng.normal(-0.3, 0.1, 40)]
    laws = Laws(horizon=synthetic_law("horizon", 0.4, h_draws, [60, 120, 240]),
                batch=synthetic_law("batch", -0.3, b_draws, [4, 8, 16]))
    proxy = ProxyTrain(**PROXY_TRAIN)
    tokens, batch = 1e9, 256.0
    fix = correction(laws, proxy, tokens, batch, TransferCorrection(horizon="fitted", batch="fitted"))
    p_tokens, p_batch = 120 * 8 * 128, 8
    by_hand = [(tokens / p_tokens) ** -bh * (batch / p_batch) ** -bb for bh in h_draws for bb in b_draws]
    assert fix["interval"]["n_draws"] == 60 * 40
    # the same numbers through another route (powers here, 2^(-beta log2 x) there): float rounding only
    assert fix["interval_90"] == pytest.approx([percentile(by_hand, 0.05), percentile(by_hand, 0.95)], rel=1e-9)
    assert fix["factor"] == pytest.approx((tokens / p_tokens) ** -0.4 * (batch / p_batch) ** 0.3)
    # one law applied: its own draws alone
    only = correction(laws, proxy, tokens, batch, TransferCorrection(horizon="fitted"))
    alone = [(tokens / p_tokens) ** -b for b in h_draws]
    assert only["interval_90"] == pytest.approx([percentile(alone, 0.05), percentile(alone, 0.95)], rel=1e-9)


def test_the_interval_widens_with_the_extrapolation():
    rng = np.random.default_rng(1)
    draws = [round(float(b), 4) for b in rng.normal(0.4, 0.05, 200)]
    laws = Laws(horizon=synthetic_law("horizon", 0.4, draws, [60, 120, 240]))
    proxy = ProxyTrain(**PROXY_TRAIN)
    widths = []
    for tokens in (1e6, 1e8, 1e10):
        fix = correction(laws, proxy, tokens, 8.0, TransferCorrection(horizon="fitted"))
        lo, hi = fix["interval_90"]
        widths.append(math.log2(hi / lo))
        assert fix["terms"]["horizon"]["extrapolation"] == pytest.approx(tokens / (240 * 128))
    assert widths[0] < widths[1] < widths[2]
    # one law: the log-width is the spread of beta times log2(target / proxy), so it grows in proportion
    # (the percentiles of a monotone function of beta are that function of beta's percentiles, up to the
    # linear interpolation between two neighbouring draws: well under 1 % with 200 draws)
    ratio = [math.log2(t / (120 * 8 * 128)) for t in (1e6, 1e8, 1e10)]
    assert widths[2] / widths[1] == pytest.approx(ratio[2] / ratio[1], rel=0.01)


# ---------------------------------------------------------------- locks without draws


def test_a_lock_without_draws_gets_its_interval_from_beta_ci_and_says_so(tmp_path, capsys, horizon_check):
    verdict, config = horizon_check
    old = json.loads(json.dumps(verdict))
    del old["law"]["law"]["draws"]  # a verdict written before the draws were kept
    entry = law_from_verdict(old, config, "horizon")
    assert entry["draws"] is None
    body = {k: v for k, v in entry.items() if k not in ("draws", "model_params", "tokens_budget")}  # an old lock
    lock = lock_with(tmp_path, {"horizon": body})
    assert read_lock(lock).laws.horizon.draws is None
    plan = plan_json(capsys, lock, "transfer.horizon='fitted'")
    fix = plan["lr_transfer"]["correction"]
    assert fix["interval"]["sources"]["horizon"].startswith("beta_ci alone")
    # the split normal through beta_ci puts its 5th and 95th percentiles at beta_ci's ends, so the
    # factor's interval is the factor at those ends (1000 evenly spaced quantiles read by linear
    # interpolation: 1e-3 of beta's spread, far below 1e-3 of the factor here)
    lo_beta, hi_beta = entry["beta_ci"]
    ratio = fix["terms"]["horizon"]["target"] / fix["terms"]["horizon"]["proxy"]
    assert fix["interval_90"] == pytest.approx(sorted([ratio ** -hi_beta, ratio ** -lo_beta]), rel=1e-3)
    assert fix["terms"]["horizon"]["tokens_per_parameter"]["fitted_range"] is None  # not recorded: said
    assert all(g["lr_interval_90"] is not None for g in plan["lr_transfer"]["groups"])
    assert main(["plan", SMOKE, "--hparams", str(lock), "--set", "transfer.horizon='fitted'"]) == 0
    out = capsys.readouterr().out
    assert "beta_ci alone" in out and "fitted range not recorded" in out


def test_a_lock_without_laws_has_no_interval_and_says_why(capsys):
    plan = plan_json(capsys, ROOT / "full_scale" / "smoke.hparams.lock.json")
    lr = plan["lr_transfer"]
    assert lr["correction"]["interval_90"] is None and plan["warnings"] == []
    assert all(g["lr_interval_90"] is None for g in lr["groups"])
    assert main(["plan", SMOKE]) == 0
    assert "interval: none (no fitted law" in capsys.readouterr().out


def test_a_law_not_applied_shows_the_would_be_interval_and_warns_nothing(tmp_path, capsys, horizon_check):
    entry = law_from_verdict(*horizon_check, "horizon")
    lock = lock_with(tmp_path, {"horizon": {**entry, "outcome": "inconclusive"}})
    plan = plan_json(capsys, lock)  # the smoke config keeps transfer.horizon = 'off'
    fix = plan["lr_transfer"]["correction"]
    assert fix["factor"] == 1.0 and fix["interval"]["of"] == "the would-be correction (not applied)"
    assert all(not g["applied"] and g["lr_interval_90"] for g in plan["lr_transfer"]["groups"])
    assert plan["warnings"] == []


# ---------------------------------------------------------------- warnings: past the limit, not passed


def test_extrapolation_warns_only_past_the_limit():
    proxy = ProxyTrain(**PROXY_TRAIN)
    laws = Laws(horizon=synthetic_law("horizon", 0.4, None, [60, 120, 240]))  # fitted up to 30,720 tokens
    use = TransferCorrection(horizon="fitted")
    inside = correction(laws, proxy, 240 * 128 * EXTRAPOLATION_LIMIT, 8.0, use)
    assert inside["terms"]["horizon"]["extrapolation"] == pytest.approx(EXTRAPOLATION_LIMIT)
    assert inside["warnings"] == []
    beyond = correction(laws, proxy, 240 * 128 * EXTRAPOLATION_LIMIT * 1.01, 8.0, use)
    assert [(w["kind"], w["law"]) for w in beyond["warnings"]] == [("law_extrapolation", "horizon")]
    assert "carried 8.08x past its largest fitted value" in beyond["warnings"][0]["message"]


@pytest.mark.parametrize("outcome, warned", [("pass", False), ("inconclusive", True), ("fail", True)])
def test_a_law_whose_check_did_not_pass_warns_when_applied(outcome, warned):
    laws = Laws(batch=synthetic_law("batch", -0.3, None, [4, 8, 16], outcome=outcome))
    fix = correction(laws, ProxyTrain(**PROXY_TRAIN), 1e5, 32.0, TransferCorrection(batch="fitted"))
    assert fix["terms"]["batch"]["extrapolation"] == 2.0  # inside the limit: only the outcome can warn
    assert [w["kind"] for w in fix["warnings"]] == (["law_outcome"] if warned else [])
    if warned:
        assert f"whose verdict was {outcome}, not pass" in fix["warnings"][0]["message"]


def far_law(horizon_check, outcome: str) -> dict:
    """The check's law as if its runs were 1 x 2 tokens a step: fitted up to 480 tokens, which puts the
    smoke run (86,016 tokens; 11,264 in its short form) 179x (23x) past it."""
    verdict, config = horizon_check
    verdict = {**verdict, "outcome": outcome}
    small = {"spec": {**config["spec"], "train": {**config["spec"]["train"], "batch_size": 1, "seq_len": 2}}}
    return law_from_verdict(verdict, small, "far")


def test_plan_warns_in_text_and_json_past_the_limit_and_for_a_check_that_did_not_pass(tmp_path, capsys,
                                                                                     horizon_check):
    lock = lock_with(tmp_path, {"horizon": far_law(horizon_check, "inconclusive")})
    plan = plan_json(capsys, lock, "transfer.horizon='fitted'")
    term = plan["lr_transfer"]["correction"]["terms"]["horizon"]
    assert term["extrapolation"] == pytest.approx(term["target"] / 480) and term["extrapolation"] > 100
    assert [w["kind"] for w in plan["warnings"]] == ["law_extrapolation", "law_outcome"]
    assert main(["plan", SMOKE, "--hparams", str(lock), "--set", "transfer.horizon='fitted'"]) == 0
    out = capsys.readouterr().out
    assert f"warning: the horizon law is carried {term['extrapolation']:.3g}x past" in out
    assert "warning: the horizon law applied to the LR comes from a transfer check" in out


@pytest.mark.parametrize("far, outcome", [(False, "pass"), (True, "inconclusive")])
def test_train_says_the_warnings_on_stderr_at_start(tmp_path, capsys, horizon_check, far, outcome):
    entry = far_law(horizon_check, outcome) if far else law_from_verdict(*horizon_check, "horizon")
    lock = lock_with(tmp_path, {"horizon": entry})
    out = tmp_path / "run"
    assert main(["train", SMOKE, "--hparams", str(lock), "--out", str(out), "--quiet",
                 "--set", "transfer.horizon='fitted'", *SHORT]) == 0
    err = capsys.readouterr().err
    assert ("warning: the horizon law is carried" in err) == far
    assert ("whose verdict was inconclusive" in err) == far
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()] \
        if (out / "events.jsonl").is_file() else []
    assert sum(e.get("event") == "warning" and "horizon law" in e.get("message", "") for e in events) == 2 * far
