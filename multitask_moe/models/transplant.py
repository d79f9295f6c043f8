"""Making one model's state from another's, by task name and by expert: the task lifecycle.

A task owns rows of task-indexed tables (task embedding, routing rows A[t], per-task
routers W[t], heads, loss scales, usage statistics); an expert pool owns slices of
expert-indexed arrays. Each such parameter tags its axes when it is created
(`task_axis`, `expert_axis`, `route_axis`, `class_axis` metadata), so the same code
serves every change of tasks or experts:

    tags = axis_tags(target_model)                 # {path: {"task_axis": 0, ...}}
    values = transplant(source_values, target_values, tags, rows)

with `rows` (a RowMap) saying, for the target model, which source task fills each task
row, which source experts each sparse layer holds and which router columns it keeps.
Extraction maps one task and the kept experts; adding tasks maps old tasks by name and
leaves new rows at their fresh initialization.

Values are pure dicts (nnx.to_pure_dict); paths are tuples of their keys. Shape legend:
T tasks, E experts, C classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx, traverse_util

AXIS_TAGS = ("task_axis", "expert_axis", "route_axis", "class_axis")

Path = tuple


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
    experts: Mapping[Path, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    routes: Mapping[Path, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    class_tasks: tuple[int | None, ...] | None = None


def axis_tags(model: nnx.Module | nnx.State) -> dict[Path, dict[str, int]]:
    """{path: {tag: axis}} of every tagged variable of `model` (abstract or concrete), or
    of a state split from one (e.g. the abstract parameters of a StateSpec)."""
    tags = {}
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    for path, variable in nnx.to_flat_state(state):
        metadata = variable.get_metadata()
        found = {tag: metadata[tag] for tag in AXIS_TAGS if metadata.get(tag) is not None}
        if found:
            tags[tuple(path)] = found
    return tags


def _layer_of(path: Path, layers: Mapping[Path, object]) -> Path | None:
    """The sparse layer path that `path` lies in (the longest matching prefix), or None."""
    matches = [layer for layer in layers if path[: len(layer)] == layer]
    return max(matches, key=len) if matches else None


def _take(value: np.ndarray, axis: int, index: Sequence[int]) -> np.ndarray:
    return np.take(value, np.asarray(index, np.int64), axis=axis)


def transplant(
    source: Mapping, target: Mapping, tags: Mapping[Path, Mapping[str, int]], rows: RowMap
) -> dict:
    """The target's pure-dict values with every leaf taken from the source where it has one.

    source, target: pure dicts of two models' state (parameters or other variables);
    tags: axis_tags of the target model. A target leaf the source lacks (e.g. the stem of
    a modality the source had no task of) keeps its target value. A tagged leaf is read
    through `rows`; a class axis is cut to the target's classes, or padded with the
    target's values. Raises ValueError naming the path when a leaf still differs in shape:
    the two models differ in more than their tasks and experts.
    """
    flat_source = traverse_util.flatten_dict(dict(source))
    flat_target = traverse_util.flatten_dict(dict(target))
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
                    f"{'/'.join(map(str, path))}: the source has shape "
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
                f"{'/'.join(map(str, path))}: the source has shape {list(value.shape)} after "
                f"mapping tasks and experts, the target {list(fresh.shape)}"
            )
        out[path] = value.astype(fresh.dtype)
    return traverse_util.unflatten_dict(out)


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
