"""Weight decay by the Power Lines law (mutransfer.wd_law): the fit, its verdict, the lock and its use."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mutransfer.config import ConfigError
from mutransfer.wd_law import (
    Point,
    WeightDecayLaw,
    fit_power_lines,
    judge_held_out,
    log2_tau,
    predict_wd_log2,
    weight_decay_at_target,
)

LR = 2.0**-6.25
LOG2_C, M = 1.5, -0.4  # the synthetic law: tau_opt = 2^1.5 (D/N)^-0.4
SEQ_TOKENS = 8 * 128  # tokens per step
NOISE = 0.1  # octaves: the spread of each point's optimum over its bootstrap draws (a 3-seed check's size)
N_DRAWS = 400


def grid(seed: int = 0, offset: float = 0.0) -> tuple[list[Point], Point]:
    """3 model sizes x 3 horizons on the synthetic law, each optimum with paired noisy draws; the largest
    (N, D) held out, its measured optimum moved by ``offset`` octaves off the law."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, NOISE, N_DRAWS)  # a seed effect common to every point (draws are paired)
    points = []
    for params in (200_000, 500_000, 1_500_000):
        for steps in (120, 240, 480):
            tokens = steps * SEQ_TOKENS
            true = float(predict_wd_log2(LOG2_C, M, LR, params, tokens, steps))
            draws = true + shared + rng.normal(0, NOISE, N_DRAWS)
            points.append(Point(params=params, tokens=tokens, steps=steps, wd_log2=true, draws=draws))
    held = points.pop()
    held = Point(held.params, held.tokens, held.steps, held.wd_log2 + offset, held.draws + offset)
    return points, held


def test_timescale_definition():
    # tau = 1 / (eta lambda S): eta = 2^-6, lambda = 2^2, S = 2^4 -> tau = 1
    assert float(log2_tau(2.0, 2.0**-6, 16)) == pytest.approx(0.0)
    # the prediction inverts it: tau_opt = 1 at D/N = 1 when log2 c = 0
    assert float(predict_wd_log2(0.0, -0.5, 2.0**-6, 1000, 1000, 16)) == pytest.approx(2.0)


def test_fit_recovers_known_law_within_its_interval():
    points, _ = grid()
    fit = fit_power_lines(points, LR)
    # exact optima: the point estimates are the law itself (to float rounding)
    assert fit["log2_c"]["estimate"] == pytest.approx(LOG2_C, abs=1e-9)
    assert fit["m"]["estimate"] == pytest.approx(M, abs=1e-9)
    for name, true in (("log2_c", LOG2_C), ("m", M)):
        lo, hi = fit[name]["ci"]
        assert lo < true < hi
        assert hi - lo < 1.0  # noise of 0.1 octave per point cannot make the interval wider than an octave
    assert len(fit["draws"]["m"]) == N_DRAWS


def test_fit_without_draws_has_no_interval_and_refuses_one_tpp():
    points = [Point(1000, 1000 * s, s, 0.0) for s in (1, 2)]
    fit = fit_power_lines(points, LR)
    assert fit["m"]["ci"] is None
    with pytest.raises(ValueError, match="2 distinct D/N"):
        fit_power_lines([Point(1000, 5000, 5, 0.0), Point(2000, 10000, 10, 0.0)], LR)


def test_held_out_on_the_law_passes():
    points, held = grid()
    result = judge_held_out(points, held, LR, goal=0.35)
    assert result["outcome"] == "pass", result["reason"]
    assert abs(result["errors"]["power_lines"]["estimate"]) < 1e-9
    # the baselines from the smallest point (200k params, 120 steps): the timescale rule says lambda ~ 1/S,
    # so its error is the law's change of log2 lambda beyond that; keep-the-proxy's is the whole change
    proxy = points[0]
    true_change = held.wd_log2 - proxy.wd_log2
    assert result["errors"]["keep_proxy"]["estimate"] == pytest.approx(true_change)
    assert result["errors"]["timescale"]["estimate"] == pytest.approx(true_change + math.log2(held.steps / proxy.steps))
    # both baselines miss this law by far more than the goal
    assert abs(result["errors"]["timescale"]["estimate"]) > 0.35 and abs(true_change) > 0.35


def test_held_out_off_the_law_fails():
    points, held = grid(offset=1.5)
    result = judge_held_out(points, held, LR, goal=0.35)
    assert result["outcome"] == "fail", result["reason"]
    assert result["errors"]["power_lines"]["estimate"] == pytest.approx(1.5)
    lo, hi = result["errors"]["power_lines"]["ci"]
    assert lo > 0.35


def test_held_out_on_the_goals_edge_is_inconclusive_and_says_where_seeds_help():
    points, held = grid(offset=0.35)  # the error sits on the goal: its interval straddles it
    result = judge_held_out(points, held, LR, goal=0.35)
    lo, hi = result["errors"]["power_lines"]["ci"]
    assert result["outcome"] == "inconclusive" and lo < 0.35 < hi, result["reason"]
    assert "seeds at each of them narrow it" in result["reason"] and "unknown" not in result["reason"]


def law(draws: bool = True) -> WeightDecayLaw:
    points, _ = grid()
    fit = fit_power_lines(points, LR)
    return WeightDecayLaw(log2_c=fit["log2_c"]["estimate"], m=fit["m"]["estimate"], lr=LR,
                          fitted_tpp=[p.tpp for p in points], outcome="pass", source="check",
                          draws={k: list(map(float, fit["draws"][k])) for k in ("log2_c", "m")} if draws else None)


def test_weight_decay_at_target_follows_the_law():
    target = dict(lr=LR / 4, params=1_000_000_000, tokens=20_000_000_000, steps=10_000)
    fitted = weight_decay_at_target(law(), "fitted", 0.1, **target)
    expected = 2.0 ** (-math.log2(LR / 4) - math.log2(10_000) - (LOG2_C + M * math.log2(20.0)))
    assert fitted["applied"] and fitted["weight_decay"] == pytest.approx(expected, rel=1e-9)
    lo, hi = fitted["interval_90"]
    assert lo < expected < hi
    assert fitted["tpp"] == pytest.approx(20.0) and fitted["beyond_limit"] == (20.0 / max(law().fitted_tpp) > 8)
    off = weight_decay_at_target(law(), "off", 0.1, **target)
    assert not off["applied"] and off["weight_decay"] == 0.1
    assert off["law_weight_decay"] == pytest.approx(expected, rel=1e-9)  # shown by plan as the would-be value
    assert weight_decay_at_target(None, "off", 0.1, **target)["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="transfer.weight_decay"):
        weight_decay_at_target(None, "fitted", 0.1, **target)


# --- the lock: freeze attaches the law, a config applies it on demand, plan shows it ----------------


def verdict_of(result: dict) -> dict:
    """A Power Lines check's verdict.json as written (numpy arrays as lists)."""
    from proxy_sweeps.transfer_verdict import _clean

    return _clean({"outcome": result["outcome"], "reasons": [result["reason"]], "powerlines": result})


def test_freeze_reads_the_law_from_a_check_directory(tmp_path):
    from mutransfer.rundir import write_json
    from proxy_sweeps.freeze import law_warnings, read_laws

    points, held = grid()
    write_json(tmp_path / "verdict.json", verdict_of(judge_held_out(points, held, LR, goal=0.35)))
    write_json(tmp_path / "config.json", {"spec": {}})
    laws = read_laws([tmp_path])
    entry = laws["weight_decay"]
    assert entry["kind"] == "weight_decay" and entry["m"] == pytest.approx(M) and entry["outcome"] == "pass"
    assert len(entry["draws"]["m"]) == N_DRAWS and entry["m_ci"][0] < M < entry["m_ci"][1]
    assert law_warnings(laws) == []
    points, held = grid(offset=1.5)  # a check that failed: attached, with a warning in the lock
    write_json(tmp_path / "verdict.json", verdict_of(judge_held_out(points, held, LR, goal=0.35)))
    failed = read_laws([tmp_path])
    assert [w["field"] for w in law_warnings(failed)] == ["laws.weight_decay"]
    with pytest.raises(ConfigError, match="already attached"):
        read_laws([tmp_path, tmp_path])


def test_an_old_lock_without_the_law_still_loads():
    from pathlib import Path

    from mutransfer.lockfile import read_lock

    lock = read_lock(Path(__file__).resolve().parents[1] / "full_scale" / "xmodel25_recipe.lock.json")
    assert lock.laws.weight_decay is None


def test_the_fitted_weight_decay_law_sets_lambda_only_when_asked(tmp_path, capsys):
    from pathlib import Path

    from full_scale.config import load_run_config
    from mutransfer.cli import main
    from mutransfer.config import HParams
    from mutransfer.lockfile import write_lock
    from mutransfer.plan import count_params
    from mutransfer.presets import get_preset
    from mutransfer.wd_law import wd_law_from_verdict

    points, held = grid()
    entry = wd_law_from_verdict(verdict_of(judge_held_out(points, held, LR, goal=0.35)), "check")
    tiny = get_preset("tiny")
    lock = tmp_path / "lock.json"
    write_lock(lock, HParams(lr=0.01, weight_decay=0.1), tiny.param, tiny.model,
               {"proxy_train": {"steps": 120, "batch_size": 8, "seq_len": 128}}, laws={"weight_decay": entry})
    smoke = str(Path(__file__).resolve().parents[1] / "full_scale" / "smoke.toml")
    off = load_run_config(smoke, [], str(lock))
    assert off.hp.weight_decay == 0.1 and not off.wd_correction["applied"]  # the lock's value unless asked
    on = load_run_config(smoke, ["transfer.weight_decay='fitted'"], str(lock))
    params = count_params(on.shape)["params_total"]
    tokens, steps = on.stages.total_tokens, on.stages.total_steps
    expected = 2.0 ** (-math.log2(0.01) - math.log2(steps) - (LOG2_C + M * math.log2(tokens / params)))
    assert on.hp.weight_decay == pytest.approx(expected, rel=1e-3)  # rel: the lock keeps 4 significant digits
    assert on.hp.weight_decay != pytest.approx(0.1, rel=0.01)
    assert on.to_json()["wd_correction"]["weight_decay"] == on.hp.weight_decay  # recorded in the run directory
    assert main(["plan", smoke, "--hparams", str(lock), "--set", "transfer.weight_decay='fitted'"]) == 0
    out = capsys.readouterr().out
    assert f"gives base lambda {expected:.3g}"[:24] in out and "; applied" in out
    assert main(["plan", smoke, "--hparams", str(lock)]) == 0
    assert "not applied: the run keeps the lock's 0.1" in capsys.readouterr().out


def test_fitted_weight_decay_without_a_law_exits_2_naming_the_field(tmp_path, capsys):
    from pathlib import Path

    from mutransfer.cli import main
    from mutransfer.config import HParams
    from mutransfer.lockfile import write_lock
    from mutransfer.presets import get_preset

    tiny = get_preset("tiny")
    lock = tmp_path / "lock.json"
    write_lock(lock, HParams(lr=0.01), tiny.param, tiny.model, {})
    smoke = str(Path(__file__).resolve().parents[1] / "full_scale" / "smoke.toml")
    assert main(["plan", smoke, "--hparams", str(lock), "--set", "transfer.weight_decay='fitted'"]) == 2
    assert "transfer.weight_decay = 'fitted' but the lock has no weight-decay law" in capsys.readouterr().err


# --- the check: widths x steps, judged by the law -------------------------------------------------

CHECK = {"axis": "steps", "values": [16, 32, 64], "widths": [32, 64, 128], "parametrizations": ["mup"],
         "tune": "weight_decay", "wd_log2_low": -8.0, "wd_log2_high": 4.0, "seeds": 3}
TINY_TRAIN = {"steps": 16, "batch_size": 4, "seq_len": 32, "warmup": 2, "eval_every": 8, "eval_batches": 1,
              "eval_batch_size": 4}


def check_spec(**transfer):
    from proxy_sweeps.transfer import spec_from_mapping

    return spec_from_mapping({"transfer": {**CHECK, **transfer}, "model": {"preset": "tiny"}, "train": TINY_TRAIN,
                              "hparams": {"lr": LR}})


def test_a_powerlines_check_is_widths_x_steps_of_weight_decay():
    s = check_spec()
    assert [v.name for v in s.variants] == ["mup-w32", "mup-w64", "mup-w128"]
    assert [s.shape_at(v, 16).model.d_model for v in s.variants] == [32, 64, 128]
    for bad, message in (({"tune": "lr"}, "tune = 'weight_decay'"),
                         ({"parametrizations": ["mup", "sp"]}, "give one parametrization"),
                         ({"widths": [64, 32]}, "ascending")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_spec(**bad)


def synthetic_runs(out, s, offset: float = 0.0, below_grid: bool = False):
    """Held-out losses whose optimum follows the synthetic law at each (N, D) point (the largest off by
    ``offset`` octaves), parabolic in log2 lambda, with seed and batch noise; ``below_grid``: the
    smallest point's optimum 3 octaves under the grid's lowest weight decay (found at the edge)."""
    from mutransfer.plan import count_params
    from tests.test_transfer_axes import write_runs

    def optimum(name: str, value: int) -> float:
        variant = next(v for v in s.variants if v.name == name)
        train = s.train_at(value)
        params = count_params(s.shape_at(variant, value))["params_total"]
        true = float(predict_wd_log2(LOG2_C, M, LR, params, train.steps * train.tokens_per_step, train.steps))
        if below_grid and (variant, value) == (s.variants[0], s.settings.values[0]):
            return s.settings.wd_log2_low - 3.0
        return true + (offset if (variant, value) == (s.variants[-1], s.settings.values[-1]) else 0.0)

    write_runs(out, s, optimum, noise=0.005)
    return optimum


@pytest.mark.parametrize("offset, outcome", [(0.0, "pass"), (2.0, "fail")])
def test_the_check_judges_the_laws_held_out_prediction(tmp_path, offset, outcome):
    from proxy_sweeps.transfer_verdict import format_verdict, judge

    s = check_spec()
    synthetic_runs(tmp_path, s, offset)
    v = judge(tmp_path, s)
    assert v["outcome"] == outcome, v["reasons"]
    fit = v["powerlines"]["fit"]
    # 0.005 nats of noise on curves of 0.03 nats/octave^2 place each optimum to ~0.1 octave: m to ~0.2
    assert fit["m"]["estimate"] == pytest.approx(M, abs=0.2 if offset == 0 else 1.0)
    assert set(v["powerlines"]["errors"]) == {"power_lines", "timescale", "keep_proxy"}
    assert "Power Lines law" in format_verdict(v)


@pytest.mark.parametrize("offset", [0.0, 2.0])
def test_a_law_fitted_on_an_optimum_at_the_grids_edge_is_inconclusive_either_way(tmp_path, offset):
    """The smallest point's optimum lies below the grid: the fit takes the edge for it, and what the
    prediction would say is not established. With the held-out point on the law (offset 0) the edge
    alone bends the fit by more than the goal, so a plain verdict would call a right law wrong."""
    from proxy_sweeps.transfer_verdict import judge

    s = check_spec()
    synthetic_runs(tmp_path, s, offset, below_grid=True)
    verdict = judge(tmp_path, s)
    power = verdict["powerlines"]
    assert power["unsure_points"] == ["width 32 x 16 steps"]
    assert power["outcome"] == verdict["outcome"] == "inconclusive" and power["exit_status"] == 3
    assert "would fail" in power["reason"] and abs(power["errors"]["power_lines"]["estimate"]) > 0.35
    assert "not established at width 32 x 16 steps" in power["reason"]


SHIPPED = Path(__file__).resolve().parents[1] / "proxy_sweeps" / "wd_powerlines_tiny.toml"


def test_the_shipped_check_is_3x3_and_spans_tokens_per_parameter():
    from mutransfer.plan import count_params
    from proxy_sweeps.transfer import load_transfer_spec

    s = load_transfer_spec(SHIPPED)
    assert s.settings.widths == [32, 64, 128] and s.settings.values == [120, 240, 480]
    tpp = [s.train_at(v).steps * s.train_at(v).tokens_per_step / count_params(s.shape_at(var, v))["params_total"]
           for var in s.variants for v in s.settings.values]
    assert max(tpp) / min(tpp) >= 8  # the span a law needs (the horizon checks' 8x), here in D/N


@pytest.mark.slow
def test_a_reduced_powerlines_check_trains_and_writes_the_law(tmp_path):
    """The shipped file on a reduced grid (2 widths x 3 short horizons x 3 weight decays x 2 seeds, tiny
    batches): every run trains, verdict.json holds c, m, their intervals and the three held-out errors,
    and freeze's reader turns it into a lock entry."""
    from mutransfer.cli import main
    from proxy_sweeps.freeze import read_laws
    from proxy_sweeps.transfer import read_runs

    out = tmp_path / "out"
    overrides = ["transfer.widths=[32, 64]", "transfer.values=[8, 16, 32]", "transfer.seeds=2",
                 "transfer.wd_log2_low=-2", "transfer.wd_log2_high=4", "transfer.wd_log2_step=3",
                 "transfer.bootstrap=200", "train.steps=8", "train.batch_size=4", "train.seq_len=32",
                 "train.warmup=1", "train.decay=2", "train.eval_every=8", "train.eval_batches=1",
                 "train.eval_batch_size=4"]
    args = ["transfer-check", str(SHIPPED), "--out", str(out), "--workers", "2", "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) in (0, 1, 3)
    runs = read_runs(out)
    assert len(runs) == 2 * 3 * 3 * 2 and {r["status"] for r in runs} == {"ok"}
    assert {r["width"] for r in runs} == {32, 64}
    verdict = json.loads((out / "verdict.json").read_text())
    power = verdict["powerlines"]
    for name in ("log2_c", "m"):
        assert power["fit"][name]["estimate"] is not None and len(power["fit"][name]["ci"]) == 2
    assert set(power["errors"]) == {"power_lines", "timescale", "keep_proxy"}
    assert all(e["estimate"] is not None for e in power["errors"].values())
    assert read_laws([out])["weight_decay"]["source"] == str(out)


def test_the_figure_puts_the_widths_in_order_not_as_text(tmp_path):
    """verdict.json keeps variants in key order (mup-w128 before mup-w32); the panels go by width."""
    from analysis.transfer import _variant_width, draw
    from proxy_sweeps.transfer import read_runs
    from proxy_sweeps.transfer_verdict import judge

    s = check_spec()
    synthetic_runs(tmp_path, s)
    judge(tmp_path, s)
    runs = read_runs(tmp_path)
    names = json.loads((tmp_path / "verdict.json").read_text())["variants"]
    assert list(names) == ["mup-w128", "mup-w32", "mup-w64"]
    assert sorted(names, key=lambda n: _variant_width(runs, n)) == ["mup-w32", "mup-w64", "mup-w128"]
    assert draw(tmp_path).stat().st_size > 0
