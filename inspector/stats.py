"""How sure are we: exact binomial intervals, calibration targets from reviews, the escape rate.

All intervals are exact (Clopper-Pearson) two-sided intervals at ``level`` (95 % by default): the bounds
are the proportions p at which the binomial tail probability of the observed count is (1 - level) / 2.
They are conservative: the true proportion lies inside at least ``level`` of the time, whatever it is.
Computed with the regularized incomplete beta function by bisection on the binomial CDF (plain Python,
exact to 1e-12), so nothing beyond the standard library is needed on a line PC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[X <= k] for X ~ Binomial(n, p), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f, lo: float = 0.0, hi: float = 1.0) -> float:
    """The root of a monotone decreasing ``f`` on [lo, hi] by bisection."""
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a proportion after ``k`` successes in ``n`` trials (n = 0: [0, 1])."""
    if n == 0:
        return 0.0, 1.0
    alpha = (1.0 - level) / 2
    lower = 0.0 if k == 0 else _solve(lambda p: alpha - (1.0 - binomial_cdf(k - 1, n, p)))
    upper = 1.0 if k == n else _solve(lambda p: binomial_cdf(k, n, p) - alpha)
    return lower, upper


@dataclass
class Proposal:
    """A threshold proposed for a target, with the intervals at it on the reviewed images."""

    threshold: float | None
    recall: float | None
    recall_interval: tuple[float, float]
    false_alarm: float | None
    false_alarm_interval: tuple[float, float]
    more_defects_needed: int  # reviewed defects still needed before the target can be shown (0: met)


def _at(scores: np.ndarray, labels: np.ndarray, threshold: float, level: float) -> tuple:
    flagged = scores >= threshold
    defects, normals = int((labels == 1).sum()), int((labels == 0).sum())
    tp, fp = int((flagged & (labels == 1)).sum()), int((flagged & (labels == 0)).sum())
    return (tp / defects if defects else None, clopper_pearson(tp, defects, level),
            fp / normals if normals else None, clopper_pearson(fp, normals, level))


def defects_needed(target: float, level: float = 0.95) -> int:
    """Reviewed defects, all caught, needed for the lower bound of recall to reach ``target``."""
    if target <= 0:
        return 0
    if target >= 1:
        raise UsageError("a recall of 1 can never be shown with confidence; choose a target below 1")
    alpha = (1.0 - level) / 2
    return max(1, math.ceil(math.log(alpha) / math.log(target)))  # lower bound of n/n is alpha**(1/n)


def propose_for_recall(scores: np.ndarray, labels: np.ndarray, target: float, level: float = 0.95) -> Proposal:
    """The highest threshold whose recall's *lower* bound reaches ``target`` (fewest false alarms), or, if
    no threshold does, the one catching every reviewed defect, with how many more defects must be reviewed."""
    defects = np.sort(scores[labels == 1])[::-1]
    if defects.size == 0:
        return Proposal(None, None, (0.0, 1.0), None, (0.0, 1.0), defects_needed(target, level))
    chosen = None
    for caught in range(1, defects.size + 1):
        if clopper_pearson(caught, defects.size, level)[0] >= target:
            chosen = float(defects[caught - 1])
            break
    needed = 0
    if chosen is None:
        chosen = float(defects[-1])
        needed = max(0, defects_needed(target, level) - int(defects.size))
    return Proposal(chosen, *_at(scores, labels, chosen, level), more_defects_needed=needed)


def propose_for_false_alarms(scores: np.ndarray, labels: np.ndarray, limit: float,
                             level: float = 0.95) -> Proposal:
    """The lowest threshold whose false-alarm rate's *upper* bound stays within ``limit`` (best recall)."""
    if not (labels == 0).any():
        return Proposal(None, None, (0.0, 1.0), None, (0.0, 1.0), 0)
    for threshold in np.unique(np.r_[scores, 1.0]):  # ascending: the first that satisfies has the best recall
        at = _at(scores, labels, float(threshold), level)
        if at[3][1] <= limit:
            return Proposal(float(threshold), *at, more_defects_needed=0)
    return Proposal(None, None, (0.0, 1.0), None, (0.0, 1.0), 0)


@dataclass
class EscapeRate:
    """Defects among audited passes, scaled to all passes of the window."""

    passes: int
    audited: int  # audited passes a reviewer judged normal or defect
    escapes_found: int
    rate: float | None  # share of passes that are defects
    interval: tuple[float, float]
    estimated_escapes: float | None
    estimated_escapes_interval: tuple[float, float]


def escape_rate(passes: int, audited: int, found: int, level: float = 0.95) -> EscapeRate:
    low, high = clopper_pearson(found, audited, level)
    rate = found / audited if audited else None
    return EscapeRate(passes, audited, found, rate, (low, high), rate * passes if rate is not None else None,
                      (low * passes, high * passes))
