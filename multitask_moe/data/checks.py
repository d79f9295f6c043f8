"""Argument checks shared by a mixture's entry points (plain Python; no data is read).

parse_weights      {name: weight} or [name, ...] -> names, weights (ValueError if bad)
resolve_process    (process_index, process_count), None meaning jax's own
local_batch_size   K = B / process_count, the rows of one process's slice of a batch
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from numbers import Real

from multitask_moe.data import tasks as tasks_lib
from multitask_moe.errors import check_int


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process; None stands for jax.process_index() / process_count()."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    tasks_lib.check_process(process_index, process_count)
    return process_index, process_count


def local_batch_size(batch_size: object, process_count: int) -> int:
    """K = batch_size / process_count: `batch_size` is the global batch."""
    batch_size = check_int(batch_size, "batch_size", 1)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by "
            f"process_count={process_count}."
        )
    return batch_size // process_count


@dataclasses.dataclass(frozen=True)
class StreamArgs:
    """The checked arguments of one process's training stream."""

    split: str
    batch_size: int  # B, the global batch
    local: int  # K = B / process_count, this process's rows of it
    seed: int
    start_step: int
    process: tuple[int, int]  # (process_index, process_count)


def stream_args(
    split: str,
    batch_size: object,
    seed: object,
    start_step: object,
    process_index: int | None,
    process_count: int | None,
) -> StreamArgs:
    """`StreamArgs` from a training stream's arguments (ValueError for a bad one)."""
    process = resolve_process(process_index, process_count)
    local = local_batch_size(batch_size, process[1])
    return StreamArgs(
        split=split,
        batch_size=batch_size,
        local=local,
        seed=check_int(seed, "seed", 0),
        start_step=check_int(start_step, "start_step", 0),
        process=process,
    )


def parse_weights(tasks: Mapping[str, float] | Sequence[str]) -> tuple[list[str], list[float]]:
    """Task names in task-id order and their weights (a list of names: all weight 1)."""
    if isinstance(tasks, str):  # a str is a Sequence too: one letter per "task"
        raise ValueError(
            f"tasks must be a mapping name -> weight or a list of names, got {tasks!r}."
        )
    items = list(tasks.items()) if isinstance(tasks, Mapping) else [(name, 1.0) for name in tasks]
    if not items:
        raise ValueError("A mixture needs at least one task.")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique, got {names}.")
    for name, weight in items:
        if not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"Weight of task {name!r} must be a finite number >= 0, got {weight!r}."
            )
    if not any(weight > 0 for _, weight in items):
        raise ValueError(f"At least one task weight must be > 0, got {dict(items)}.")
    return names, [float(weight) for _, weight in items]
