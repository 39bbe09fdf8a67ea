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


def test_a_curved_optimum_is_caught_and_the_weighted_line_recommended():
    """The curved law wins on a quadratic truth but is not carried to a target; the weighted line, which
    reads its slope off the longest horizons, beats the straight one and is what the check recommends."""
    samples = optima([curved(t) for t in HORIZONS], sd=0.03)
    out = compare_forms(HORIZONS[:3], samples[:3], HORIZONS[3], samples[3])
    rows = out["forms"]
    assert rows["straight"]["ci"][1] < -0.3  # the straight line under-predicts the fall, as measured on tiny
    assert rows["curved"]["ci"][0] < 0.0 < rows["curved"]["ci"][1]  # exact for a quadratic truth
    assert out["better"] == ["weighted", "curved"]
    assert rows["weighted"]["vs_configured"]["ci"][1] < 0
    assert out["recommended"] == "weighted" and "set [transfer] law_form = 'weighted'" in out["reason"]
    text = "\n".join(format_forms(out))
    assert "recommended: weighted" in text and "the check's law is straight" in text


def test_a_curvature_alone_is_reported_not_recommended():
    """With the weighted line configured, only the curved law beats it: the check keeps its law and says
    why the curved one is not carried."""
    samples = optima([curved(t) for t in HORIZONS], sd=0.03)
    out = compare_forms(HORIZONS[:3], samples[:3], HORIZONS[3], samples[3], configured="weighted")
    assert out["better"] == ["curved"] and out["recommended"] == "weighted"
    assert "keep the weighted law" in out["reason"] and "is not carried to a target" in out["reason"]


def test_the_weighted_form_is_the_power_law_with_weights_proportional_to_the_horizon():
    samples = optima([curved(t) for t in HORIZONS], sd=0.03)
    fit = fit_form(HORIZONS[:3], samples[:3], HORIZONS[3], samples[3], "weighted")
    x, y = np.log2(HORIZONS[:3]), np.array([np.median(s) for s in samples[:3]])
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(np.array(HORIZONS[:3]) / 480))  # polyfit squares w
    assert fit["beta"]["estimate"] == pytest.approx(-slope, abs=1e-9)
    assert fit["prediction"]["estimate"] == pytest.approx(intercept + slope * math.log2(960), abs=1e-9)


def test_a_straight_optimum_keeps_the_straight_law():
    """Noise of 0.1 octave per optimum: one doubling past the data the curved law weighs the three optima
    1, -3, 3 (the straight law -2/3, 1/3, 4/3), so its held-out error is about 2.4x as wide."""
    samples = optima([straight(t) for t in HORIZONS], sd=0.1, seed=1)
    out = compare_forms(HORIZONS[:3], samples[:3], HORIZONS[3], samples[3])
    assert out["better"] == [] and out["recommended"] == "straight" and "keep the straight law" in out["reason"]
    rows = out["forms"]
    assert rows["straight"]["ci"][0] < 0.0 < rows["straight"]["ci"][1]
    width = {f: rows[f]["ci"][1] - rows[f]["ci"][0] for f in rows}
    assert width["curved"] > 2 * width["straight"]


def test_too_few_horizons_for_a_curve_leave_the_straight_law():
    samples = optima([curved(t) for t in HORIZONS[:3]], sd=0.03)
    out = compare_forms(HORIZONS[:2], samples[:2], HORIZONS[2], samples[2])
    assert out["forms"]["curved"]["residual"] is None
    assert "needs optima at 3 distinct values" in out["forms"]["curved"]["reason"]
    assert out["recommended"] == "straight"  # through two points the weighted line is the straight one
    assert "no prediction" in "\n".join(format_forms(out))


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        fit_form(HORIZONS[:3], optima([1, 2, 3], 0.1), 960, form="cubic")
