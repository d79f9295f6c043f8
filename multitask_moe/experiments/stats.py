"""Mean and spread over seeds; whether a paper's direction is shown by a paired one-sided
t-test over the seeds at level ALPHA; and structural checks, which are not tests.

A verdict compares two measured keys seed by seed. Under no true difference, a
directional comparison reads "agrees" with probability ALPHA and "disagrees" with
probability ALPHA (the per-seed differences taken as independent and normal); anything
the test cannot decide reads "within noise", and fewer than two seeds "not enough seeds".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from scipy import stats as scipy_stats

ALPHA = 0.05  # the one-sided level of every test; the intervals are 1 - 2 * ALPHA (90%)
MAX_SEEDS = 50  # the largest seed count seeds_to_decide proposes

AGREES = "agrees"
DISAGREES = "disagrees"
WITHIN_NOISE = "within noise"
NOT_ENOUGH_SEEDS = "not enough seeds"
HOLDS = "holds"
FAILS = "fails"

# What the paper says of a - b: ">" higher, "<" lower, ">=" not lower by more than the
# tolerance (a margin), "~" within the tolerance either way.
DIRECTIONS = (">", "<", ">=", "~")
RELATIONS = ("=", "<", "<=", ">", ">=")  # the relations a Check holds to in every seed


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


def stat(values: Sequence[float]) -> Stat:
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def aggregate(per_seed: Sequence[Mapping[str, float]]) -> dict[str, Stat]:
    """{key: Stat over seeds} of the keys every seed measured."""
    keys = [k for k in per_seed[0] if all(k in seed for seed in per_seed)]
    return {k: stat([seed[k] for seed in per_seed]) for k in keys}


@dataclasses.dataclass(frozen=True)
class Compare:
    """One directional statement of a paper, as the difference a - b of two measured
    keys (`expect` one of DIRECTIONS; `tolerance` the margin of ">=" and "~")."""

    label: str
    a: str
    b: str
    expect: str
    tolerance: float = 0.0

    def __post_init__(self):
        if self.expect not in DIRECTIONS:
            raise ValueError(f"expect={self.expect!r}; allowed: {list(DIRECTIONS)}")
        if self.expect in (">=", "~") and not self.tolerance > 0:
            raise ValueError(f"expect={self.expect!r} needs a tolerance > 0, got {self.tolerance}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    label: str
    difference: Stat  # a - b, over seeds
    expect: str
    outcome: str
    tolerance: float = 0.0
    p_value: float | None = None  # of the test for the paper's statement; None: no test
    interval: tuple[float, float] | None = None  # 1 - 2 * ALPHA interval of the mean
    seeds_to_decide: int | None = None  # seeds at which the observed effect would decide


def _t_quantile(n: int) -> float:
    return float(scipy_stats.t.ppf(1 - ALPHA, n - 1))


def _p_above(d: Stat, threshold: float) -> float:
    """One-sided p-value of "the mean difference is above threshold" (paired t-test)."""
    if d.std == 0:
        return 0.0 if d.mean > threshold else 1.0 if d.mean < threshold else 0.5
    t = (d.mean - threshold) / (d.std / math.sqrt(d.n))
    return float(scipy_stats.t.sf(t, d.n - 1))


def seeds_to_decide(d: Stat, threshold: float = 0.0) -> int | None:
    """The fewest seeds (up to MAX_SEEDS) at which a mean difference of d.mean with spread
    d.std would clear the one-sided test against `threshold`; None if none would."""
    gap = abs(d.mean - threshold)
    if gap == 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if gap > _t_quantile(n) * d.std / math.sqrt(n):
            return n
    return None


def judge(compare: Compare, per_seed: Sequence[Mapping[str, float]]) -> Verdict:
    """The per-seed differences a - b decide, by one-sided paired t-tests at ALPHA.

    ">" ("<"): agrees if the mean difference is shown above (below) zero, disagrees if
    shown on the other side. ">=": agrees if shown above -tolerance (non-inferiority),
    disagrees if shown below it. "~": agrees if shown inside (-tolerance, tolerance) by
    both one-sided tests (equivalence), disagrees if shown outside it.
    """
    d = stat([seed[compare.a] - seed[compare.b] for seed in per_seed])
    tol = compare.tolerance
    if d.n < 2:
        return Verdict(compare.label, d, compare.expect, NOT_ENOUGH_SEEDS, tol)
    half = _t_quantile(d.n) * d.std / math.sqrt(d.n)
    interval = (d.mean - half, d.mean + half)
    if compare.expect == "~":
        p = max(_p_above(d, -tol), 1 - _p_above(d, tol))
        shown_outside = _p_above(d, tol) < ALPHA or 1 - _p_above(d, -tol) < ALPHA
        outcome = AGREES if p < ALPHA else DISAGREES if shown_outside else WITHIN_NOISE
        nearest = tol if d.mean >= 0 else -tol
        needed = seeds_to_decide(d, nearest)
    else:
        # The paper's side: a - b above `threshold` (">", ">="), or below it ("<").
        sign = -1.0 if compare.expect == "<" else 1.0
        threshold = -tol if compare.expect == ">=" else 0.0
        signed = Stat(sign * d.mean, d.std, d.n)
        p = _p_above(signed, sign * threshold)
        outcome = AGREES if p < ALPHA else DISAGREES if 1 - p < ALPHA else WITHIN_NOISE
        needed = seeds_to_decide(d, threshold)
    if outcome != WITHIN_NOISE:
        needed = None
    return Verdict(compare.label, d, compare.expect, outcome, tol, p, interval, needed)


@dataclasses.dataclass(frozen=True)
class Check:
    """A structural fact of the setting (true by construction when the code is right,
    e.g. an extracted model is smaller than its source): `a relation b` in every seed.
    Reported as a check, never as a paper's claim reproduced."""

    label: str
    a: str
    b: str
    relation: str

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"relation={self.relation!r}; allowed: {list(RELATIONS)}")


_HOLDS = {
    "=": lambda a, b: a == b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    label: str
    relation: str
    difference: Stat  # a - b, over seeds
    outcome: str  # HOLDS or FAILS
    failing_seeds: int


def check(fact: Check, per_seed: Sequence[Mapping[str, float]]) -> CheckResult:
    pairs = [(seed[fact.a], seed[fact.b]) for seed in per_seed]
    failing = sum(not _HOLDS[fact.relation](a, b) for a, b in pairs)
    d = stat([a - b for a, b in pairs])
    return CheckResult(fact.label, fact.relation, d, FAILS if failing else HOLDS, failing)
