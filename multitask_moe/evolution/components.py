"""Components: named parameter blocks with locks, the units a muNet system shares.

A component holds a parameter pytree (host numpy arrays or device arrays) and, once it
has trained, its optimizer state. Its locks are the tasks whose finished paths use it; a
component with any lock is frozen forever. A child that wants to change a locked
component clones it: a deep copy of parameters and optimizer state with no locks, which
only that child trains. Trainable components are never shared between paths.

    pool = ComponentPool()
    stem = pool.add("stem/image", params)
    copy = pool.clone(stem)          # trainable, same values, inherits optimizer state
    pool.lock([stem, copy], "digits/class")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax
import numpy as np


class LockedComponentError(RuntimeError):
    """An attempt to change a component that a finished task uses."""


@dataclasses.dataclass
class Component:
    """id: unique in its pool; name: what it is in a path ("block3", "head", ...);
    params / opt_state: pytrees; locks: tasks whose finished paths use it; origin: the
    id it was cloned from (None for a new or root component); statistics: its
    non-parameter state (e.g. an MoE layer's usage EMA), carried like the parameters."""

    id: int
    name: str
    params: object
    opt_state: object = None
    locks: frozenset[str] = frozenset()
    origin: int | None = None
    statistics: object = None

    @property
    def size(self) -> int:
        """Number of parameter entries."""
        return int(sum(np.size(leaf) for leaf in jax.tree.leaves(self.params)))

    @property
    def trainable(self) -> bool:
        return not self.locks


class ComponentPool:
    """All live components by id; ids are never reused, so a path's list of ids names the
    same parameters for as long as the path exists."""

    def __init__(self, components: Iterable[Component] = (), next_id: int = 0):
        self._components = {c.id: c for c in components}
        self._next_id = max([next_id, *(c.id + 1 for c in self._components.values())])

    def __contains__(self, component_id: int) -> bool:
        return component_id in self._components

    def __getitem__(self, component_id: int) -> Component:
        return self._components[component_id]

    def __iter__(self):
        return iter(self._components.values())

    def __len__(self) -> int:
        return len(self._components)

    @property
    def next_id(self) -> int:
        return self._next_id

    def add(
        self, name: str, params, opt_state=None, locks: Iterable[str] = (), statistics=None
    ) -> int:
        component = Component(
            self._next_id, name, params, opt_state, frozenset(locks), statistics=statistics
        )
        self._components[component.id] = component
        self._next_id += 1
        return component.id

    def clone(self, component_id: int, name: str | None = None) -> int:
        """A trainable deep copy (parameters and optimizer state) of a component, named
        `name` when it takes another place in a path (an expert copied into a free slot)."""
        source = self[component_id]
        component = Component(
            self._next_id,
            source.name if name is None else name,
            _copy_tree(source.params),
            _copy_tree(source.opt_state),
            frozenset(),
            origin=source.id,
            statistics=_copy_tree(source.statistics),
        )
        self._components[component.id] = component
        self._next_id += 1
        return component.id

    def update(self, component_id: int, params, opt_state=None, statistics=None) -> None:
        """New values of a trainable component; LockedComponentError for a locked one."""
        component = self[component_id]
        if component.locks:
            raise LockedComponentError(
                f"component {component_id} ({component.name}) is locked by "
                f"{sorted(component.locks)}: clone it to change it"
            )
        component.params, component.opt_state = params, opt_state
        component.statistics = statistics

    def lock(self, component_ids: Iterable[int], task: str) -> None:
        """Adds `task` to the locks of every component (the end of the task)."""
        for component_id in component_ids:
            component = self[component_id]
            component.locks = component.locks | {task}

    def drop(self, component_ids: Iterable[int]) -> None:
        """Forgets unlocked components (those of discarded paths); locked ones stay."""
        for component_id in list(component_ids):
            if component_id in self and not self[component_id].locks:
                del self._components[component_id]

    def sharing(self) -> Mapping[int, frozenset[str]]:
        """{component id: its locks}."""
        return {c.id: c.locks for c in self._components.values()}


def _copy_tree(tree):
    """A copy on the host that shares no buffer with `tree` (device or numpy leaves)."""
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)
