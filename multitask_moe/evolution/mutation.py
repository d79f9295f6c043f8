"""Mutations of a parent path into a child: hyperparameter steps and component choices.

Each mutation applies with probability mu, itself a per-path hyperparameter that mutates
like the others within [0.1, 0.3]. A hyperparameter lives on an ordered ladder and moves
one rung up or down (50/50, clamped at the ends). For the components: a locked one is
reused as it is or, with probability mu, cloned into a trainable copy; one the parent
still trains is always cloned (two paths never train one component); names in
`always_clone` (the final norm) are always cloned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from multitask_moe.evolution.components import ComponentPool

MU_LADDER = (0.1, 0.15, 0.2, 0.25, 0.3)
REUSE, CLONE = "reuse", "clone"


def check_ladder(name: str, value, ladder: Sequence) -> int:
    if value not in ladder:
        raise ValueError(f"hyperparameter {name}={value!r} is not on its ladder {list(ladder)}")
    return list(ladder).index(value)


def step(rng: np.random.Generator, name: str, value, ladder: Sequence):
    """`value` moved one rung up or down its ladder (50/50), clamped at the ends."""
    index = check_ladder(name, value, ladder) + (1 if rng.random() < 0.5 else -1)
    return ladder[min(max(index, 0), len(ladder) - 1)]


def mutate_hparams(
    rng: np.random.Generator, hparams: Mapping[str, object], ladders: Mapping[str, Sequence]
) -> dict[str, object]:
    """Each laddered hyperparameter steps with probability mu (the parent's `mu`)."""
    mu = float(hparams["mu"])
    out = dict(hparams)
    for name, ladder in ladders.items():
        if rng.random() < mu:
            out[name] = step(rng, name, hparams[name], ladder)
    return out


def component_actions(
    rng: np.random.Generator,
    components: Sequence[int],
    pool: ComponentPool,
    mu: float,
    always_clone: Sequence[str] = ("final_norm",),
) -> list[tuple[int, str]]:
    """[(parent component id, REUSE | CLONE)] for a child of a path with `components`."""
    actions = []
    for component_id in components:
        component = pool[component_id]
        must = component.trainable or component.name in always_clone
        actions.append((component_id, CLONE if must or rng.random() < mu else REUSE))
    return actions
