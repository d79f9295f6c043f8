"""Paths: a task's model as an ordered list of components plus its hyperparameters, and
the score that trades its quality against the parameters it adds.

    P(path) = sum over its components c of size(c) / |locks(c) + {task}|
    score   = q * s ** (P / P_root)

q is the best validation accuracy seen while the child trained; a component shared by k
finished tasks besides this one costs 1 / (k + 1) of its size, so reusing is cheap and
cloning pays the full size. s in (0, 1] sets the price of size (1: none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from multitask_moe.evolution.components import ComponentPool


@dataclasses.dataclass
class Path:
    """id: unique; task: the task it solves; components: component ids in model order;
    hparams: {name: value} (learning rate, adapter size, mu, ...); parent: the path it was
    mutated from (None for the root); quality, score: set once it trained; children: how
    many children it produced for the current task (parent sampling)."""

    id: int
    task: str
    components: tuple[int, ...]
    hparams: Mapping[str, object]
    parent: int | None = None
    quality: float | None = None
    score: float | None = None
    children: int = 0


def accounted_params(components: tuple[int, ...], pool: ComponentPool, task: str) -> float:
    """P: each component's size divided by the number of tasks sharing it, `task` counted."""
    total = 0.0
    for component_id in components:
        component = pool[component_id]
        total += component.size / len(component.locks | {task})
    return total


def score(quality: float, params: float, root_params: float, size_scale: float) -> float:
    """q * s ** (P / P_root); size_scale s in (0, 1]."""
    check_size_scale(size_scale)
    if root_params <= 0:
        raise ValueError(f"root_params={root_params} must be > 0")
    return quality * size_scale ** (params / root_params)


def check_size_scale(size_scale: float) -> None:
    if not 0 < size_scale <= 1:
        raise ValueError(f"size scale s={size_scale} must be in (0, 1] (1: no size penalty)")
