"""Pass@k (the unbiased estimator) and Avg@n, and the per-sample values SampledAccuracy averages over samples."""

from __future__ import annotations

import math

import pytest

from trd_lightning.metrics import SampledAccuracy, pass_at_k


def closed_form(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k", [(16, 0, 1), (16, 0, 16), (16, 16, 1), (16, 16, 16), (16, 3, 1), (16, 3, 4),
                                     (16, 3, 16), (16, 15, 2), (5, 2, 5), (1, 1, 1), (1, 0, 1), (100, 1, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_and_pass_over_problems():
    metric = SampledAccuracy(n=4, ks=[1, 2, 4])
    metric.update([0, 4])
    metric.update([1])
    out = metric.compute()
    assert float(out["avg@4"]) == pytest.approx((0 + 1 + 0.25) / 3)
    assert float(out["pass@1"]) == pytest.approx((0 + 1 + 0.25) / 3)
    assert float(out["pass@2"]) == pytest.approx((0 + 1 + closed_form(4, 1, 2)) / 3)
    assert float(out["pass@4"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="correct count"):
        metric.update([5])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        SampledAccuracy(n=4, ks=[8])


def test_per_sample_values_are_means_over_samples_and_unknown_ones_refused():
    from trd_lightning.metrics import SampledAccuracy

    metric = SampledAccuracy(n=2, ks=[1])
    metric.update([2, 0], steps_valid=[1.0, 1.0, 0.0, 0.0])
    metric.update([1], steps_valid=[0.0, 1.0])
    assert float(metric.compute()["steps_valid"]) == pytest.approx(3 / 6)
    assert "tests_passed" not in metric.compute()
    with pytest.raises(ValueError, match="unknown per-sample value 'step_valid'"):
        metric.update([1], step_valid=[1.0, 0.0])
