"""Anytime-valid statistics (cl_release.decide.sequential): formulas, and error rates under continuous
monitoring in seeded simulations (small: the large ones are bench/bench_abtest.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cl_release.decide import sequential


def test_p_value_and_interval_agree():
    # p <= alpha exactly when the interval excludes 0, for any difference and variance.
    for diff in (-0.08, -0.03, 0.0, 0.01, 0.05, 0.2):
        for var in (1e-5, 1e-4, 1e-3):
            d = sequential.difference(diff, var, alpha=0.05, tau=0.05)
            assert (d.p_value <= 0.05) == (d.better or d.worse), (diff, var)
            assert d.interval[0] < diff < d.interval[1]


def test_interval_is_wider_than_a_fixed_horizon_one_and_matches_the_published_boundary():
    var, tau, alpha = 4e-4, 0.05, 0.05
    half = sequential.mixture_half_width(var, alpha=alpha, tau=tau)
    assert half > 1.96 * math.sqrt(var)  # the price of looking at any time
    # Howard et al. 2021, normal mixture in intrinsic time t = 1/V with rho = 1/tau^2:
    # |S_t| <= sqrt((t + rho) log((t + rho) / (rho alpha^2))), S_t = t * diff.
    t, rho = 1 / var, 1 / tau**2
    assert half * t == pytest.approx(math.sqrt((t + rho) * math.log((t + rho) / (rho * alpha**2))))


def test_proportions_variance_never_zero():
    d = sequential.proportions(50, 50, 50, 50, alpha=0.05, tau=0.05)  # all positive on both sides
    assert d.variance > 0 and d.diff == 0 and d.p_value == 1.0
    assert sequential.proportions(0, 0, 3, 10, alpha=0.05, tau=0.05) is None
    assert sequential.means((1, 0.5, 0.25), (5, 2.0, 1.0), alpha=0.05, tau=0.05) is None


def test_binomial_acceptance_is_the_set_the_mixture_accepts():
    def log_ratio(s, n, q, r):
        a, b = q * r, (1 - q) * r
        lbeta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
        return lbeta(a + s, b + n - s) - lbeta(a, b) - s * math.log(q) - (n - s) * math.log(1 - q)

    for n in (1, 7, 40, 333, 2000):
        for alpha in (0.05, 0.003):
            accepted = [s for s in range(n + 1) if log_ratio(s, n, 0.95, 100) < math.log(1 / alpha)]
            assert sequential.binomial_acceptance(n, 0.95, alpha=alpha) == (accepted[0], accepted[-1])
            assert accepted == list(range(accepted[0], accepted[-1] + 1))


def test_srm_chi_square():
    s = sequential.srm_test(900, 100, 0.1)
    assert s["chi2"] == 0 and s["p_value"] == 1.0 and s["share"] == 0.1
    s = sequential.srm_test(1000 - 131, 131, 0.1)  # chi2 = 31^2/100 + 31^2/900 = 10.68: p just above 0.001
    assert s["chi2"] == pytest.approx(10.6778, abs=1e-3) and 0.001 < s["p_value"] < 0.0012
    assert sequential.srm_test(1000 - 140, 140, 0.1)["p_value"] < 1e-4
    assert sequential.srm_test(0, 0, 0.1)["p_value"] is None


# ---------------------------------------------------------------- continuous monitoring


def test_proportions_type_one_error_under_continuous_monitoring():
    """A/A: 400 streams, 10%/90% split, a look after every 25 rated answers up to 7,500: the
    always-valid interval ever excludes 0 in at most alpha of the streams; the fixed-horizon
    z-test at the same looks does in several times alpha (the simulation can tell the two apart)."""
    rng = np.random.default_rng(1)
    streams, looks, step, alpha = 400, 300, 25, 0.05
    seq_hits = z_hits = 0
    for _ in range(streams):
        arm = rng.random(looks * step) < 0.1
        up = rng.random(looks * step) < 0.6
        nb, xb = np.cumsum(arm)[step - 1::step], np.cumsum(arm & up)[step - 1::step]
        na, xa = np.arange(step, looks * step + 1, step) - nb, np.cumsum(~arm & up)[step - 1::step] - 0
        ever_seq = ever_z = False
        for k in range(looks):
            if nb[k] == 0:
                continue
            d = sequential.proportions(int(xa[k]), int(na[k]), int(xb[k]), int(nb[k]), alpha=alpha, tau=0.05)
            ever_seq = ever_seq or d.better or d.worse
            pa, pb, pooled = xa[k] / na[k], xb[k] / nb[k], (xa[k] + xb[k]) / (na[k] + nb[k])
            se = math.sqrt(pooled * (1 - pooled) * (1 / na[k] + 1 / nb[k]))
            ever_z = ever_z or (se > 0 and abs(pb - pa) / se > 1.96)
        seq_hits += ever_seq
        z_hits += ever_z
    assert seq_hits <= alpha * streams  # 20; 1.5% expected (the mixture is conservative)
    assert z_hits > 3 * alpha * streams  # peeking: ~40%


def test_quantile_interval_covers_the_true_p95_at_every_look():
    """Log-normal latencies (true p95 known), a look every 50 answers up to 3,000: each side of
    the interval misses the true p95 at some look in at most alpha of the streams."""
    rng = np.random.default_rng(2)
    streams, alpha = 300, 0.1
    true_p95 = 800 * math.exp(0.5 * 1.6448536269514722)
    low_miss = high_miss = 0
    for _ in range(streams):
        x = rng.lognormal(math.log(800), 0.5, 3000)
        missed_low = missed_high = False
        for n in range(50, 3001, 50):
            xs = np.sort(x[:n])
            lo, hi = sequential.quantile_interval(n, lambda k: float(xs[k - 1]), q=0.95, alpha=alpha)
            missed_low = missed_low or (lo is not None and lo > true_p95)
            missed_high = missed_high or (hi is not None and hi < true_p95)
        low_miss += missed_low
        high_miss += missed_high
    assert low_miss <= alpha * streams and high_miss <= alpha * streams
    # and the interval is informative: at 3,000 answers it is within ~10% of the true p95
    assert lo is not None and hi is not None and 0.9 * true_p95 < lo < hi < 1.1 * true_p95
