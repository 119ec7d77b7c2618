"""The adaptive hedge delay's estimator (``serving.hedge_delay``): exact values on
tiny hand-made sequences (window, floor, warm-up, recompute cadence)."""

import threading

import numpy as np
import pytest

from serving import hedge_delay


def test_delay_is_the_windowed_quantile_recomputed_on_its_cadence_with_a_floor():
    est = hedge_delay.HedgeDelay(quantile=0.5, floor_s=0.01, window=5, every=2, warmup=3)
    got = []
    for x in (0.1, 0.3, 0.2, 0.4, 0.5, 0.001, 0.002, 0.003, 0.004):
        est.record(x)
        got.append(est.delay_s)
    assert got == [
        None, None,  # warming up: no delay, so no hedging
        0.2,         # 3rd answer: median of (0.1, 0.3, 0.2)
        0.2,         # 4th: not recomputed (every 2 after the warm-up), though the median moved
        0.3,         # 5th: median of (0.1, 0.3, 0.2, 0.4, 0.5)
        0.3,         # 6th: 0.001 replaced 0.1 (window of 5), not recomputed
        0.2,         # 7th: median of (0.001, 0.002, 0.2, 0.4, 0.5)
        0.2,
        0.01,        # 9th: median of (0.001, 0.002, 0.003, 0.004, 0.5) = 0.003, floored
    ]
    assert est.samples == 9
    assert est.window().tolist() == [0.001, 0.002, 0.003, 0.004, 0.5]


def test_a_high_quantile_interpolates_between_the_answers():
    est = hedge_delay.HedgeDelay(quantile=0.9, floor_s=0.0, window=5, every=1, warmup=5)
    for x in (0.5, 0.1, 0.4, 0.2, 0.3):
        est.record(x)
    # Sorted 0.1..0.5, position 0.9 * 4 = 3.6: 0.4 + 0.6 * (0.5 - 0.4).
    assert est.delay_s == pytest.approx(0.46, abs=1e-12)
    est.record(0.0)  # replaces 0.5: sorted 0, 0.1, 0.2, 0.3, 0.4 -> 0.3 + 0.6 * 0.1
    assert est.delay_s == pytest.approx(0.36, abs=1e-12)


def test_defaults_warm_up_on_100_answers_and_recompute_every_64():
    est = hedge_delay.HedgeDelay()
    assert (est.quantile, est.floor_s) == (0.99, 0.001)
    for i in range(99):
        est.record(0.002 + i * 1e-5)
    assert est.delay_s is None
    est.record(0.5)  # the 100th: one slow answer in 100 sits above the p99
    want = float(np.quantile(np.r_[0.002 + np.arange(99) * 1e-5, 0.5], 0.99))
    assert est.delay_s == pytest.approx(want, rel=1e-12) and 0.002 < want < 0.5
    for _ in range(63):
        est.record(0.5)
    assert est.delay_s == pytest.approx(want, rel=1e-12)  # the 163rd answer: not yet
    est.record(0.5)
    assert est.delay_s == 0.5  # the 164th: 65 of 164 answers at 0.5


def test_concurrent_records_are_all_counted():
    est = hedge_delay.HedgeDelay(window=50, every=7, warmup=10)

    def work():
        for _ in range(2000):
            est.record(0.003)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert est.samples == 8000 and est.delay_s == 0.003


def test_bad_settings_are_refused():
    for q in (0.0, 1.0, -0.5, 1.5, float("nan"), np.True_):
        with pytest.raises(ValueError, match="hedge_quantile must be in"):
            hedge_delay.HedgeDelay(quantile=q)
    for floor in (-0.001, float("inf"), float("nan"), True, False):  # True is no 1 s
        with pytest.raises(ValueError, match="hedge_min_s must be a finite number"):
            hedge_delay.HedgeDelay(floor_s=floor)
    with pytest.raises(ValueError, match="warmup <= window"):
        hedge_delay.HedgeDelay(window=10, warmup=11)
    with pytest.raises(ValueError, match="every >= 1"):
        hedge_delay.HedgeDelay(every=0)


def test_the_quantile_matches_numpy_linear_interpolation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1000):
        x = rng.exponential(0.002, n)
        for q in (0.01, 0.5, 0.9, 0.99, 0.999):
            assert hedge_delay._quantile(x.copy(), q) == pytest.approx(
                float(np.quantile(x, q)), rel=1e-12, abs=0.0)
