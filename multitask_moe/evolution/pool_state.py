"""Values between the component pool and a path's model state: the state a path
assembles from its components, the moments a child inherits from the components it
cloned (mu2Net: a clone keeps its optimizer state), and what a trained child stores back
into its own unlocked components. path_model.owners says which component owns each
leaf, or each expert slice of a leaf.

    state = assemble(pool, path, arch, fresh)
    opt_state = inherit_moments(pool, path, arch, state, opt_state)
    store(pool, path, arch, trained)
"""

from __future__ import annotations

from multitask_moe.evolution import child, path_model
from multitask_moe.evolution.components import ComponentPool
from multitask_moe.evolution.paths import Path


def assemble(pool: ComponentPool, path: Path, arch: path_model.Architecture, fresh) -> dict:
    """The path's model state: `fresh`'s structure with its components' values."""
    parts = {
        name: path_model.Values(pool[cid].params, pool[cid].statistics)
        for name, cid in zip(arch.component_names(), path.components, strict=True)
    }
    return path_model.assemble(fresh, parts, arch)


def inherit_moments(pool: ComponentPool, path: Path, arch, state, opt_state):
    """`opt_state` (fresh, of core.state.adamw with the rate in state) with the stored
    Adam moments of the path's trainable components (clones) in their leaves or expert
    slices."""
    stored = {}
    for name, cid in zip(arch.component_names(), path.components, strict=True):
        component = pool[cid]
        if component.trainable and component.opt_state:
            stored[name] = component.opt_state
    return path_model.owners(arch, state).with_moments(opt_state, stored)


def store(pool: ComponentPool, path: Path, arch, trained: child.Trained) -> None:
    """The trained values of the path's unlocked components go into the pool: parameters,
    statistics and each component's own slice of the Adam moments."""
    parts = path_model.split(trained.state, arch)
    moments = path_model.owners(arch, trained.state).moments(trained.opt_state)
    for name, cid in zip(arch.component_names(), path.components, strict=True):
        if pool[cid].trainable:
            pool.update(cid, parts[name].params, moments.get(name), parts[name].statistics)
