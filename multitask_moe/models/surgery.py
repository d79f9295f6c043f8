"""State surgery over the axis tags: the cuts and stitches every lifecycle step makes
with one piece of metadata.

A task owns rows of task-indexed tables (task embedding, routing rows A[t], per-task
routers W[t], heads, loss scales, usage statistics); an expert pool owns slices of
expert-indexed arrays. Each such variable tags its axes when it is created (`task_axis`,
`expert_axis`, `route_axis`, `class_axis` metadata, read by keys.axis_tags):

    tags = axis_tags(target_model)                  # {path: {"task_axis": 0, ...}}
    values = transplant(source_values, target_values, tags, rows)   # rows: a RowMap
    mask = trainable_mask(abstract_params, tags, "shared", new_tasks=(4, 5))
    new = keep_frozen(new, old, mask)               # the train step's frozen entries

Extraction maps one task and the kept experts (`transplant`); a warm start maps old
tasks by name and freezes their rows (`transplant`, `trainable_mask`, whose freeze modes
are owners in the sense of models/ownership.py: the new tasks' rows train, the rest
stays); the train step keeps frozen entries (`keep_frozen`); evolution's path models
(evolution/path_model.py) own the same tagged expert axes slot by slot with
ownership.Owners, which also slices the optimizer's moments with their parameters.

Values are pure dicts (nnx.to_pure_dict); a leaf's path is its key tuple (models/keys.py).
Shape legend: T tasks, E experts, C classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multitask_moe.models.keys import KeyPath, flatten, key_names, path_text, unflatten
from multitask_moe.models.ownership import Owners


@dataclasses.dataclass(frozen=True)
class RowMap:
    """How the target's tagged axes read the source's.

    tasks: for each target task, the source task whose rows it takes, or None to keep
      the target's own (freshly initialized) rows.
    experts: {sparse layer path: source experts the target layer holds, in order}; a
      layer not named holds the same experts as the source.
    routes: {sparse layer path: source router columns the target router keeps}; a layer
      not named keeps every column.
    class_tasks: the task map of leaves with a class axis (heads), when it differs from
      `tasks`: a new task started from a seen task's rows keeps a fresh head, since its
      classes are its own. None: `tasks`.
    """

    tasks: tuple[int | None, ...]
    experts: Mapping[KeyPath, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    routes: Mapping[KeyPath, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    class_tasks: tuple[int | None, ...] | None = None


def _layer_of(path: KeyPath, layers: Mapping[KeyPath, object]) -> KeyPath | None:
    """The sparse layer path that `path` lies in (the longest matching prefix), or None."""
    matches = [layer for layer in layers if path[: len(layer)] == layer]
    return max(matches, key=len) if matches else None


def _take(value: np.ndarray, axis: int, index: Sequence[int]) -> np.ndarray:
    return np.take(value, np.asarray(index, np.int64), axis=axis)


def transplant(
    source: Mapping, target: Mapping, tags: Mapping[KeyPath, Mapping[str, int]], rows: RowMap
) -> dict:
    """The target's pure-dict values with every leaf taken from the source where it has one.

    source, target: pure dicts of two models' state (parameters or other variables);
    tags: axis_tags of the target model. A target leaf the source lacks (e.g. the stem of
    a modality the source had no task of) keeps its target value. A tagged leaf is read
    through `rows`; a class axis is cut to the target's classes, or padded with the
    target's values. Raises ValueError naming the path when a leaf still differs in shape:
    the two models differ in more than their tasks and experts.
    """
    flat_source, flat_target = flatten(source), flatten(target)
    layers = {**rows.experts, **rows.routes}
    out = {}
    for path, fresh in flat_target.items():
        if path not in flat_source:
            out[path] = fresh
            continue
        value = flat_source[path]
        leaf_tags = tags.get(path, {})
        if not leaf_tags:  # copied as it is (PRNG keys included, which numpy cannot hold)
            if np.shape(value) != np.shape(fresh):
                raise ValueError(
                    f"{path_text(path)}: the source has shape "
                    f"{list(np.shape(value))}, the target {list(np.shape(fresh))}"
                )
            out[path] = value
            continue
        fresh, value = np.asarray(fresh), np.asarray(value)
        layer = _layer_of(path, layers)
        if "expert_axis" in leaf_tags and layer in rows.experts:
            value = _take(value, leaf_tags["expert_axis"], rows.experts[layer])
        if "route_axis" in leaf_tags and layer in rows.routes:
            value = _take(value, leaf_tags["route_axis"], rows.routes[layer])
        tasks = rows.tasks
        if rows.class_tasks is not None and "class_axis" in leaf_tags:
            tasks = rows.class_tasks
        value = _task_and_class_rows(value, fresh, leaf_tags, tasks)
        if value.shape != fresh.shape:
            raise ValueError(
                f"{path_text(path)}: the source has shape {list(value.shape)} after "
                f"mapping tasks and experts, the target {list(fresh.shape)}"
            )
        out[path] = value.astype(fresh.dtype)
    return unflatten(out)


def transplant_state(source: nnx.State, target: nnx.State, tags, rows: RowMap) -> nnx.State:
    """`transplant` on nnx.States (host values): a copy of `target` filled from `source`."""
    values = transplant(nnx.to_pure_dict(source), nnx.to_pure_dict(target), tags, rows)
    filled = jax.tree.map(lambda leaf: leaf, target)  # a copy: `target` stays as it is
    nnx.replace_by_pure_dict(filled, values)
    return filled


def _task_and_class_rows(
    value: np.ndarray, fresh: np.ndarray, leaf_tags: Mapping[str, int], tasks: Sequence[int | None]
) -> np.ndarray:
    """Target task rows (source row tasks[i], or the target's own row i where None), each
    with its class axis cut to the target's or padded with the target's own values."""
    class_axis = leaf_tags.get("class_axis")
    if "task_axis" not in leaf_tags:
        return value if class_axis is None else _fit(value, fresh, class_axis)
    axis = leaf_tags["task_axis"]
    if len(tasks) != fresh.shape[axis]:
        raise ValueError(f"the row map has {len(tasks)} tasks, the target {fresh.shape[axis]}")
    pieces = []
    for i, source in enumerate(tasks):
        own = _take(fresh, axis, [i])
        row = own if source is None else _take(value, axis, [source])
        pieces.append(row if class_axis is None else _fit(row, own, class_axis))
    return np.concatenate(pieces, axis=axis)


def _fit(value: np.ndarray, fresh: np.ndarray, axis: int) -> np.ndarray:
    """value cut to fresh's size along `axis`, or padded there with fresh's own values."""
    size, have = fresh.shape[axis], value.shape[axis]
    if have >= size:
        return _take(value, axis, range(size))
    return np.concatenate([value, _take(fresh, axis, range(have, size))], axis=axis)


FREEZE_MODES = ("none", "experts", "shared")


def trainable_mask(
    params,
    tags: Mapping[KeyPath, Mapping[str, int]],
    mode: str,
    *,
    new_tasks: Collection[int] = (),
    new_paths: Collection[KeyPath] = (),
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
    owners = freeze_owners(params, tags, mode, new_paths=new_paths)
    new_tasks = set(new_tasks)
    flags = {"trains": True, "stays": statistics}
    for _, rows in owners.sliced.values():
        flags.update({owner: owner[1] in new_tasks for owner in rows.values()})
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: owners.mask(key_names(path), np.shape(leaf), flags), params
    )


def freeze_owners(
    params, tags: Mapping[KeyPath, Mapping[str, int]], mode: str, *, new_paths=()
) -> Owners:
    """The owners of a freeze mode: "trains" and "stays" for whole leaves, and under
    "shared" ("task", t) for row t of every task-indexed leaf the old model had."""
    new_paths = {tuple(p) for p in new_paths}
    if mode == "none":
        return Owners(whole=lambda path: "trains")
    if mode == "experts":
        return Owners(
            whole=lambda path: "stays" if "expert_axis" in tags.get(path, {}) else "trains"
        )
    sliced = {}
    for path, leaf in flatten(params).items():
        axis = tags.get(path, {}).get("task_axis")
        if axis is not None and path not in new_paths:
            sliced[path] = (axis, {t: ("task", t) for t in range(np.shape(leaf)[axis])})
    return Owners(whole=lambda path: "trains" if path in new_paths else "stays", sliced=sliced)


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
