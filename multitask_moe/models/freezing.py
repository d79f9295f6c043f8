"""Which parameters train: element masks over the parameter tree, from the axis tags.

Freezing is a mask, not a different model: the train step zeroes the gradients of frozen
entries (so they do not count in the clipped global norm) and keeps their old values
after the update (so neither the optimizer step nor weight decay moves them: frozen
values stay bit-identical). A task-indexed table can be frozen row by row, which is how
the old tasks of a grown model keep their rows while the new tasks' rows train.

    mask = trainable_mask(abstract_params, tags, "shared", new_tasks=(4, 5), new_paths=...)

Each leaf of the mask is a numpy bool array that broadcasts against its parameter:
shape () for a whole leaf, or 1 everywhere except the task axis for a row mask.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

FREEZE_MODES = ("none", "experts", "shared")

Path = tuple


def key_path(path) -> Path:
    """A jax key path of a parameter tree -> the tuple of keys axis_tags uses."""
    keys = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(entry.key)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            keys.append(entry.idx)
        # GetAttrKey("value") of a Variable is not part of the name.
    return tuple(keys)


def trainable_mask(
    params,
    tags: Mapping[Path, Mapping[str, int]],
    mode: str,
    *,
    new_tasks: Collection[int] = (),
    new_paths: Collection[Path] = (),
    statistics: bool = False,
):
    """A tree like `params` of bool masks: True where the entry trains under `mode`.

    statistics=True masks non-parameter state instead (the usage statistics): under
    "shared" the seen tasks' rows keep their values, so a frozen task's statistics stay
    what they were; everything else (and every statistic under the other modes) updates.

    mode: "none" (everything trains), "experts" (every leaf with an expert axis, i.e. the
      expert weights of every MoE and MoA layer, is frozen; routers, embeddings, heads
      train), or "shared" (only what serves the new tasks alone trains: their rows of
      every task-indexed leaf, and the leaves in `new_paths`, which the old model did not
      have, e.g. the stem of a modality only the new tasks have).
    tags: axis_tags of the model. new_tasks: task ids of the tasks that are new.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze={mode!r} is not allowed; allowed: {FREEZE_MODES}")
    new_tasks = sorted(new_tasks)
    new_paths = {tuple(p) for p in new_paths}

    def leaf_mask(path, leaf):
        path = key_path(path)
        leaf_tags = tags.get(path, {})
        if mode == "none" or path in new_paths:
            return np.ones((), bool)
        if statistics and (mode == "experts" or "task_axis" not in leaf_tags):
            return np.ones((), bool)
        if mode == "experts":
            return np.asarray("expert_axis" not in leaf_tags)
        if "task_axis" not in leaf_tags:
            return np.zeros((), bool)
        axis = leaf_tags["task_axis"]
        shape = [1] * len(leaf.shape)
        shape[axis] = leaf.shape[axis]
        rows = np.zeros(shape[axis], bool)
        rows[new_tasks] = True
        return rows.reshape(shape)

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def keep_frozen(new, old, mask):
    """`new` where `mask` is True, `old` elsewhere, leaf by leaf. A static (numpy) mask
    that is all True or all False picks the whole leaf without computing anything; any
    other mask, traced ones included (an evolution child's), selects element-wise."""

    def pick(new_leaf, old_leaf, m):
        if isinstance(m, np.ndarray | np.bool_ | bool):
            if np.all(m):
                return new_leaf
            if not np.any(m):
                return old_leaf
        return select(m, new_leaf, old_leaf)

    return jax.tree.map(pick, new, old, mask)


def select(mask, new, old):
    """new where the mask (broadcast over the leaf) is True, else old; typed PRNG keys
    (the router noise streams) through their data, which jnp.where cannot take."""
    if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
        data = jnp.where(mask, jax.random.key_data(new), jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(mask, new, old)


def frozen_fraction(params, mask) -> float:
    """The fraction of parameter entries `mask` freezes."""
    total = frozen = 0
    for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        size = int(np.prod(leaf.shape))
        total += size
        frozen += size - int(np.broadcast_to(m, leaf.shape).sum())
    return frozen / max(total, 1)
