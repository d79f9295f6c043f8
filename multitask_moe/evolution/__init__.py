"""muNet / mu2Net evolution of a growing multitask system (docs/methods.md, section 3).

Bookkeeping (independent of any model): components with locks (components.py), paths
and their score (paths.py), parent sampling (sampling.py), mutations (mutation.py).
On the project's model: a path's model from its components (path_model.py), values
between the pool and a path's state (pool_state.py), training a child with its locked
components frozen (child.py), a generation's children at once, one per device or
expert-parallel on groups of devices (together.py), the run's settings (settings.py),
the system that introduces tasks (system.py), its Orbax checkpoint (store.py) and its
report (report.py). The command is `python -m multitask_moe.evolve`.
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
from multitask_moe.evolution.settings import Settings
from multitask_moe.evolution.system import ROOT_TASK, System

__all__ = [
    "CLONE",
    "MU_LADDER",
    "REUSE",
    "Component",
    "ComponentPool",
    "LockedComponentError",
    "Path",
    "ROOT_TASK",
    "Settings",
    "System",
    "accounted_params",
    "component_actions",
    "mutate_hparams",
    "parent_probabilities",
    "sample_parent",
    "score",
    "step",
]
