"""Per-example reads of per-task tables under Explicit mesh axes.

With Explicit axes a gather must say how its output is sharded; rows picked by
batch-sharded task ids are batch-sharded like the ids. Outside any mesh, and over Auto
axes (children of an evolution stacked over devices), these are plain indexing.

Shape legend: B batch, T tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def take_rows(table: jax.Array, task_ids: jax.Array) -> jax.Array:
    """table [T, ...], task_ids [B, ...] -> table[task_ids] [B, ..., ...], sharded like
    task_ids (any ids of a batch: task ids [B], or byte ids [B, L] into an embedding)."""
    sharding = jax.typeof(task_ids).sharding
    explicit = jax.sharding.AxisType.Explicit
    if sharding.mesh.empty or explicit not in sharding.mesh.axis_types:
        return table[task_ids]  # no mesh, or Auto axes: XLA propagates the sharding
    ids_spec = tuple(sharding.spec) + (None,) * (task_ids.ndim - len(sharding.spec))
    out_spec = PartitionSpec(*ids_spec, *([None] * (table.ndim - 1)))
    return table.at[task_ids].get(out_sharding=out_spec)


def lookup(table: tuple[int, ...], task_ids: jax.Array) -> jax.Array:
    """table[task_ids] for a static per-task table: [T] ints, [B] ids -> [B] int32.

    A one-hot product: a Python constant has no mesh, so it cannot be gathered from with
    sharded indices; [B, T] @ [T] is as cheap for the handful of tasks a model has.
    """
    one_hot = jax.nn.one_hot(task_ids, len(table), dtype=jnp.int32)  # [B, T]
    return one_hot @ jnp.asarray(table, jnp.int32)  # [B]
