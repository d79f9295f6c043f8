"""muNet / mu2Net evolution of a growing multitask system (docs/methods.md, section 3):
components with locks, paths over them, their score, parent sampling and mutations.

This package holds the system's bookkeeping, independent of how a path's model is built
and trained: a component is any parameter pytree, a path any ordered list of them.
"""

from multitask_moe.evolution.components import Component, ComponentPool, LockedComponentError
from multitask_moe.evolution.mutation import (
    CLONE,
    MU_LADDER,
    REUSE,
    component_actions,
    mutate_hparams,
    step,
)
from multitask_moe.evolution.paths import Path, accounted_params, score
from multitask_moe.evolution.sampling import parent_probabilities, sample_parent

__all__ = [
    "CLONE",
    "MU_LADDER",
    "REUSE",
    "Component",
    "ComponentPool",
    "LockedComponentError",
    "Path",
    "accounted_params",
    "component_actions",
    "mutate_hparams",
    "parent_probabilities",
    "sample_parent",
    "score",
    "step",
]
