"""WSD schedule in closed form."""

import pytest

from mutransfer.schedule import Schedule, Segment, wsd


def test_wsd_closed_form():
    s = wsd(100, warmup=10, decay=20, final_ratio=1 / 16)
    for t in range(10):
        assert s.factor(t) == pytest.approx((t + 1) / 10)
    for t in range(10, 80):
        assert s.factor(t) == 1.0
    for t in range(80, 100):
        u = (t - 80 + 1) / 20
        assert s.factor(t) == pytest.approx(1 / 16 + (1 - 1 / 16) * (2 * 0.5**u - 1))
    assert s.factor(99) == pytest.approx(1 / 16)
    assert s.factor(500) == pytest.approx(1 / 16)


def test_bad_segments():
    with pytest.raises(ValueError, match="shape"):
        Schedule([Segment("cosine", 10, 1, 0)])
    with pytest.raises(ValueError, match="warmup"):
        wsd(10, warmup=8, decay=8)
