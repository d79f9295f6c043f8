"""Values between the component pool and a path's model state: the state a path
assembles from its components, the moments a child inherits from the components it
cloned (mu2Net: a clone keeps its optimizer state), and what a trained child stores back
into its own unlocked components. Path_model.Layout says which component owns each
leaf, or each expert slice of a leaf.

    state = assemble(pool, path, arch, fresh)
    opt_state = inherit_moments(pool, path, arch, state, opt_state)
    store(pool, path, arch, trained)
"""

from __future__ import annotations

import jax
import numpy as np

from multitask_moe.evolution import child, path_model
from multitask_moe.evolution.components import ComponentPool
from multitask_moe.evolution.paths import Path
from multitask_moe.models.surgery import adam_moment_key


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
    if not stored:
        return opt_state
    layout = path_model.Layout.of(arch, state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    out = []
    for key_path, leaf in leaves:
        key = adam_moment_key(key_path)
        if key is None:
            out.append(leaf)
            continue
        value = layout.joined(
            key[1], np.asarray(leaf), lambda name, key=key: stored.get(name, {}).get(key)
        )
        out.append(leaf if value.shape != leaf.shape else jax.numpy.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def store(pool: ComponentPool, path: Path, arch, trained: child.Trained) -> None:
    """The trained values of the path's unlocked components go into the pool: parameters,
    statistics and each component's own slice of the Adam moments."""
    parts = path_model.split(trained.state, arch)
    layout = path_model.Layout.of(arch, trained.state)
    moments: dict[str, dict] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(trained.opt_state)[0]:
        key = adam_moment_key(key_path)
        if key is None:
            continue
        for name, piece in layout.pieces(key[1], np.array(leaf, copy=True)):
            moments.setdefault(name, {})[key] = piece
    for name, cid in zip(arch.component_names(), path.components, strict=True):
        if pool[cid].trainable:
            pool.update(cid, parts[name].params, moments.get(name), parts[name].statistics)
