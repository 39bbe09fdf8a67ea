"""The horizon law's shape: straight, weighted to the longest horizons, or curved in log T, judged by
the held-out horizon's error (mutransfer.law_forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mutransfer.law_forms import compare_forms, fit_form, format_forms
from mutransfer.optimum_stats import bootstrap_optimum, fit_power_law

HORIZONS = [120, 240, 480, 960]
DRAWS = 2000


def optima(truth, sd, seed=0):
    """Bootstrap draws of each horizon's optimum: the truth plus independent noise of ``sd`` octave."""
    rng = np.random.default_rng(seed)
    return [t + sd * rng.normal(size=DRAWS) for t in truth]


def straight(t):
    return -4.0 - 0.3 * math.log2(t)


def curved(t):
    """The optimum falls faster at longer horizons (-0.2, -0.5, -0.8 octave per doubling from 120 steps)."""
    x = math.log2(t / 120)
    return -6.0 - 0.05 * x - 0.15 * x * x


def test_the_straight_form_is_the_power_law_of_the_transfer_check():
    rng = np.random.default_rng(3)
    grid = np.arange(-11.0, -2.0)
    res = [bootstrap_optimum(grid, 2.0 + 0.03 * (grid - straight(t)) ** 2 + 0.02 * rng.normal(size=(3, 4, 9)),
                             rng=rng) for t in HORIZONS]
    law = fit_power_law(HORIZONS[:3], res[:3], holdout=HORIZONS[3], holdout_samples=res[3])
    form = fit_form(HORIZONS[:3], res[:3], HORIZONS[3], res[3], "straight")
    for key in ("prediction", "residual"):
        assert form[key]["estimate"] == pytest.approx(law[key]["estimate"], abs=1e-12)  # the same algebra
        assert form[key]["ci"] == pytest.approx(law[key]["ci"], abs=1e-12)


def test_a_curved_optimum_is_caught_and_the_curved_law_chosen():
    samples = optima([curved(t) for t in HORIZONS], sd=0.03)
    out = compare_forms(HORIZONS[:3], samples[:3], HORIZONS[3], samples[3])
    rows = out["forms"]
    assert rows["straight"]["ci"][1] < -0.3  # the straight line under-predicts the fall, as measured on tiny
    assert rows["curved"]["ci"][0] < 0.0 < rows["curved"]["ci"][1]  # exact for a quadratic truth
    assert abs(rows["weighted"]["residual"]) < abs(rows["straight"]["residual"])
    assert out["chosen"] == "curved" and "smaller than the straight law's" in out["reason"]
    assert rows["curved"]["vs_straight"]["ci"][1] < 0
    text = "\n".join(format_forms(out))
    assert "chosen: curved" in text and "straight" in text


def test_a_straight_optimum_keeps_the_straight_law():
    """Noise of 0.1 octave per optimum: one doubling past the data the curved law weighs the three optima
    1, -3, 3 (the straight law -2/3, 1/3, 4/3), so its held-out error is about 2.4x as wide."""
    samples = optima([straight(t) for t in HORIZONS], sd=0.1, seed=1)
    out = compare_forms(HORIZONS[:3], samples[:3], HORIZONS[3], samples[3])
    assert out["chosen"] == "straight" and "stays the default" in out["reason"]
    rows = out["forms"]
    assert rows["straight"]["ci"][0] < 0.0 < rows["straight"]["ci"][1]
    width = {f: rows[f]["ci"][1] - rows[f]["ci"][0] for f in rows}
    assert width["curved"] > 2 * width["straight"]


def test_too_few_horizons_for_a_curve_leave_the_straight_law():
    samples = optima([curved(t) for t in HORIZONS[:3]], sd=0.03)
    out = compare_forms(HORIZONS[:2], samples[:2], HORIZONS[2], samples[2])
    assert out["forms"]["curved"]["residual"] is None
    assert "needs optima at 3 distinct values" in out["forms"]["curved"]["reason"]
    assert out["chosen"] == "straight"  # through two points the weighted line is the straight one
    assert "no prediction" in "\n".join(format_forms(out))


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        fit_form(HORIZONS[:3], optima([1, 2, 3], 0.1), 960, form="cubic")
