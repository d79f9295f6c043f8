"""Parent sampling: the task's own paths first, then the seeds, then anything.

Walk the task's paths by decreasing score, accepting the i-th with probability
0.5 ** (children it already produced); if none is accepted, walk the seeds (the best
paths of the other tasks, and the root) the same way; if still none, pick uniformly
among all of them. Good paths are tried first, and each child a path produces halves its
chance next time, so the search moves on from a parent that keeps failing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from multitask_moe.evolution.paths import Path


def acceptance(path: Path) -> float:
    return 0.5**path.children


def sample_parent(rng: np.random.Generator, population: Sequence[Path], seeds: Sequence[Path]):
    """The parent of the next child. population: the task's paths (any order; walked by
    decreasing score, ties by id); seeds: in the order to try them."""
    ordered = sorted(population, key=lambda p: (-(p.score or 0.0), p.id))
    candidates = [*ordered, *seeds]
    if not candidates:
        raise ValueError("no path to sample a parent from: the task has no population and no seed")
    for path in candidates:
        if rng.random() < acceptance(path):
            return path
    return candidates[rng.integers(len(candidates))]


def parent_probabilities(population: Sequence[Path], seeds: Sequence[Path]) -> dict[int, float]:
    """{path id: probability sample_parent returns it}: the walk's closed form."""
    ordered = sorted(population, key=lambda p: (-(p.score or 0.0), p.id))
    candidates = [*ordered, *seeds]
    out = {p.id: 0.0 for p in candidates}
    remaining = 1.0
    for path in candidates:
        out[path.id] += remaining * acceptance(path)
        remaining *= 1.0 - acceptance(path)
    for path in candidates:
        out[path.id] += remaining / len(candidates)
    return out
