"""Mean and spread over seeds, and whether a measured difference has the paper's sign."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

AGREES = "agrees"
DISAGREES = "disagrees"
WITHIN_NOISE = "within noise"


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
    """One directional statement of a paper, as a difference of two measured keys.

    expect ">": the paper says a > b; "<": a < b; "~": a and b agree within `tolerance`
    (e.g. extracted vs full accuracy); "=": exactly equal in every seed.
    """

    label: str
    a: str
    b: str
    expect: str
    tolerance: float = 0.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    label: str
    difference: Stat  # a - b, over seeds
    expect: str
    outcome: str
    tolerance: float = 0.0


def judge(compare: Compare, per_seed: Sequence[Mapping[str, float]]) -> Verdict:
    """The per-seed differences a - b decide: with several seeds, a mean difference within
    one standard deviation of zero is noise, not a direction."""
    diffs = [seed[compare.a] - seed[compare.b] for seed in per_seed]
    d = stat(diffs)
    if compare.expect == "=":
        outcome = AGREES if all(x == 0 for x in diffs) else DISAGREES
    elif compare.expect == "~":
        outcome = AGREES if abs(d.mean) <= compare.tolerance else DISAGREES
    elif compare.expect in (">", "<"):
        signed = d.mean if compare.expect == ">" else -d.mean
        if d.n > 1 and abs(d.mean) <= d.std:
            outcome = WITHIN_NOISE
        else:
            outcome = AGREES if signed > 0 else DISAGREES
    else:
        raise ValueError(f"expect={compare.expect!r}; allowed: '>', '<', '~', '='")
    return Verdict(compare.label, d, compare.expect, outcome, compare.tolerance)
