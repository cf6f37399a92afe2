"""Anytime-valid statistics: tests and intervals that stay valid however often they are checked.

A fixed-horizon test (a z-test, Welch's test) keeps its error rate ``alpha`` for one look at a
sample size fixed in advance. Checked again at every look, each look is a new chance of a false
alarm ("peeking"). The statistics here bound the chance that the null hypothesis is *ever*
rejected, over any number of looks and with any rule for when to stop (Ville's inequality on
a nonnegative martingale: ``P(sup_n M_n >= 1/alpha) <= alpha``).

- :func:`proportions` and :func:`means`: the normal-mixture sequential probability ratio test
  (mSPRT; Robbins 1970) for a difference of two means, in the form of Johari, Pekelis & Walsh,
  "Always valid inference: continuous monitoring of A/B tests" (Operations Research 70(3),
  2022; arXiv:1512.04922), as Optimizely's stats engine runs it. With ``d`` the observed
  difference, ``V`` its variance and ``tau`` the spread of the normal mixture over effects,

      Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

  The always-valid p-value is ``min(1, 1/Lambda)``; inverting the test gives the confidence
  sequence ``d +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))``,
  the normal-mixture boundary of Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform,
  nonparametric, nonasymptotic confidence sequences" (Annals of Statistics 49(2), 2021). The
  variance is estimated from the data, which makes the sequence asymptotically valid
  (Waudby-Smith, Arnold, Wu, Wang & Ramdas, "Time-uniform central limit theory and asymptotic
  confidence sequences", arXiv:2103.06476, 2021). ``p <= alpha`` exactly when the interval
  excludes 0.
- :func:`quantile_interval`: a confidence sequence for a quantile (Howard & Ramdas,
  "Sequential estimation of quantiles with applications to A/B-testing and best-arm
  identification", Bernoulli 28(3), 2022): at the true ``q``-quantile the count of
  observations below it is a Binomial(n, q) walk, and the beta-binomial mixture likelihood
  ratio is an exact martingale under it; the interval runs between the order statistics at the
  edges of the counts that mixture accepts. Exact for any distribution, no normal approximation.
- :func:`srm_test`: Pearson's chi-square goodness of fit of an observed two-way split against
  the configured share (1 degree of freedom), the sample-ratio-mismatch check.

Pure functions on counts, standard library only (``math.lgamma``, ``math.erfc``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

# Beta(q r, (1 - q) r) mixing prior of the quantile sequence: r pseudo-observations centred on
# q. Smaller r is tighter early, larger r late; 100 keeps the p95 interval within a few percent
# of the fixed-sample binomial interval's width from a few hundred to ~100,000 observations.
QUANTILE_PRIOR = 100.0


@dataclass(frozen=True)
class Difference:
    """``b - a`` with its always-valid p-value and confidence sequence at level ``1 - alpha``."""

    diff: float
    variance: float
    interval: tuple[float, float]
    p_value: float
    alpha: float
    tau: float

    @property
    def better(self) -> bool:
        """b is significantly larger than a (the interval lies above 0)."""
        return self.interval[0] > 0

    @property
    def worse(self) -> bool:
        """b is significantly smaller than a (the interval lies below 0)."""
        return self.interval[1] < 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = list(self.interval)
        return d


def mixture_p_value(diff: float, variance: float, *, tau: float) -> float:
    """``min(1, 1/Lambda)``: the normal-mixture likelihood ratio of ``diff`` against 0."""
    if variance <= 0 or tau <= 0:
        raise ValueError("variance and tau must be positive")
    t2 = tau * tau
    log_lr = 0.5 * math.log(variance / (variance + t2)) + t2 * diff * diff / (2 * variance * (variance + t2))
    return 1.0 if log_lr <= 0 else math.exp(-log_lr)


def mixture_half_width(variance: float, *, alpha: float, tau: float) -> float:
    """Half-width of the normal-mixture confidence sequence at level ``1 - alpha``."""
    if variance <= 0 or tau <= 0 or not 0 < alpha < 1:
        raise ValueError("variance and tau must be positive, alpha in (0, 1)")
    t2 = tau * tau
    return math.sqrt(variance * (variance + t2) / t2 * (2 * math.log(1 / alpha) + math.log((variance + t2) / variance)))


def difference(diff: float, variance: float, *, alpha: float, tau: float) -> Difference:
    """The always-valid p-value and interval of an observed difference with ``variance``."""
    half = mixture_half_width(variance, alpha=alpha, tau=tau)
    return Difference(diff, variance, (diff - half, diff + half), mixture_p_value(diff, variance, tau=tau), alpha, tau)


def proportions(x_a: int, n_a: int, x_b: int, n_b: int, *, alpha: float, tau: float) -> Difference | None:
    """``x_b/n_b - x_a/n_a``; None without data on both sides. The variance adds one success and
    one failure to each arm (Agresti-Caffo), so it is never 0 (all-positive small samples)."""
    if n_a <= 0 or n_b <= 0:
        return None
    var = 0.0
    for x, n in ((x_a, n_a), (x_b, n_b)):
        p = (x + 1) / (n + 2)
        var += p * (1 - p) / n
    return difference(x_b / n_b - x_a / n_a, var, alpha=alpha, tau=tau)


def means(a: tuple[int, float, float], b: tuple[int, float, float], *, alpha: float, tau: float) -> Difference | None:
    """Difference of the means of values on 0..1 from ``(n, sum, sum of squares)`` per arm; None
    below 2 values a side. The variance counts two extra values, 0 and 1, per arm (for 0/1 data
    the same correction as :func:`proportions`), so it is never 0."""
    if a[0] < 2 or b[0] < 2:
        return None
    var = 0.0
    for n, s, sq in (a, b):
        n2, s2, sq2 = n + 2, s + 1, sq + 1
        var += max(0.0, (sq2 - s2 * s2 / n2) / (n2 - 1)) / n
    return difference(b[1] / b[0] - a[1] / a[0], var, alpha=alpha, tau=tau)


# ---------------------------------------------------------------- quantiles


@functools.lru_cache(maxsize=65536)  # a pure function of its arguments, asked again at every look
def binomial_acceptance(n: int, q: float, *, alpha: float, prior: float = QUANTILE_PRIOR) -> tuple[int, int]:
    """The counts ``s`` in 0..n that the beta-binomial mixture test of rate ``q`` accepts at
    level ``alpha`` after ``n`` trials: an interval ``(lo, hi)``.

    The test rejects when the mixture likelihood ratio of ``s`` successes in ``n`` trials,
    ``B(a + s, b + n - s) / B(a, b) / (q^s (1 - q)^(n - s))`` with ``a = q prior`` and
    ``b = (1 - q) prior``, reaches ``1/alpha``; its logarithm is convex in ``s`` (least near
    ``q n``), so the accepted counts form an interval, found by bisection on each side."""
    if n <= 0:
        return 0, 0
    a, b = q * prior, (1 - q) * prior
    lg = math.lgamma
    const = lg(a + b) - lg(a) - lg(b) - lg(a + b + n) - n * math.log(1 - q)
    slope = math.log(q) - math.log(1 - q)
    limit = math.log(1 / alpha)

    def rejected(s: int) -> bool:
        return lg(a + s) + lg(b + n - s) + const - s * slope >= limit

    mode = min(n, max(0, round(q * n)))
    if rejected(mode):  # cannot happen for alpha < 1; keeps the search sound
        return mode, mode
    lo, hi = 0, mode  # first accepted count: the ratio decreases on [0, mode]
    while lo < hi:
        mid = (lo + hi) // 2
        if rejected(mid):
            lo = mid + 1
        else:
            hi = mid
    first = lo
    lo, hi = mode, n  # last accepted count: the ratio increases on [mode, n]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rejected(mid):
            hi = mid - 1
        else:
            lo = mid
    return first, lo


def quantile_interval(n: int, value_at: Callable[[int], float], *, q: float, alpha: float,
                      prior: float = QUANTILE_PRIOR) -> tuple[float | None, float | None]:
    """Confidence sequence for the ``q``-quantile of ``n`` observations at level ``1 - alpha``.

    ``value_at(k)`` is the k-th smallest observation (1-based). A bound is None where the data
    cannot give one yet (too few observations). Each side alone fails with probability at most
    ``alpha``, ties included (Howard & Ramdas 2022, with the beta-binomial mixture)."""
    if n <= 0:
        return None, None
    lo, hi = binomial_acceptance(n, q, alpha=alpha, prior=prior)
    lower = value_at(lo) if lo >= 1 else None
    upper = value_at(hi + 1) if hi + 1 <= n else None
    return lower, upper


def quantile_rank(n: int, q: float) -> int:
    """The rank (1-based) of the sample ``q``-quantile of n observations (nearest rank)."""
    return min(n, max(1, math.ceil(q * n)))


# ---------------------------------------------------------------- sample ratio mismatch


def srm_test(n_a: int, n_b: int, share_b: float) -> dict[str, Any]:
    """Chi-square test of ``n_b / (n_a + n_b)`` against the configured ``share_b``."""
    n = n_a + n_b
    if n == 0:
        return {"share": None, "expected": share_b, "chi2": None, "p_value": None}
    e_b, e_a = n * share_b, n * (1 - share_b)
    chi2 = (n_b - e_b) ** 2 / e_b + (n_a - e_a) ** 2 / e_a
    return {"share": n_b / n, "expected": share_b, "chi2": chi2, "p_value": math.erfc(math.sqrt(chi2 / 2))}
