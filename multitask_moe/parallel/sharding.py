"""Placing parameters and activations on the current mesh.

Per-expert parameters ([E, ...] arrays) are split over the 'expert' axis from the moment
they are created: the initializer runs with `out_sharding`, so each device draws only its
own experts' values and no full copy ever exists on one device. With the partitionable
threefry PRNG (jax's default) the values equal those drawn without a mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from multitask_moe.parallel.mesh import EXPERT_AXIS, check_experts_divisible, current_mesh


def expert_spec(ndim: int) -> PartitionSpec:
    """[E, ...] split over 'expert' on the leading axis, replicated elsewhere."""
    return PartitionSpec(EXPERT_AXIS, *([None] * (ndim - 1)))


def shards_experts(num_experts: int, mesh, *, replicate_indivisible: bool = False) -> bool:
    """Whether `num_experts` are split over the 'expert' axis of `mesh` (None: no mesh).

    False without a mesh, without an 'expert' axis, or when E does not divide over it and
    replicate_indivisible allows replication; a ValueError naming both sizes when it does
    not divide and replication is not allowed.
    """
    if mesh is None or EXPERT_AXIS not in mesh.axis_names or mesh.manual_axes:
        return False
    if replicate_indivisible and num_experts % mesh.shape[EXPERT_AXIS]:
        return False
    check_experts_divisible(num_experts, mesh)
    return True


def expert_param(
    init: Callable[..., jax.Array],
    key: jax.Array,
    shape: tuple[int, ...],
    dtype,
    *,
    replicate_indivisible: bool = False,
) -> nnx.Param:
    """A per-expert parameter of `shape` [E, ...], sharded over 'expert' under a mesh.

    Outside a mesh, or under a mesh with no 'expert' axis, a plain parameter. Under one,
    raises ValueError unless E is a multiple of the 'expert' axis size, or replicates the
    parameter when replicate_indivisible is set (a model extracted with an expert count of
    its own). The sharding is also recorded as the Variable's `out_sharding` metadata, so
    nnx.get_partition_spec gives the training code the right specs for jit, optimizer
    state and checkpoints. The leading axis is tagged `expert_axis=0` (moe.tables).
    """
    mesh = current_mesh()
    if not shards_experts(shape[0], mesh, replicate_indivisible=replicate_indivisible):
        return nnx.Param(init(key, shape, dtype), expert_axis=0)
    spec = expert_spec(len(shape))
    if mesh.are_all_axes_explicit:
        value = init(key, shape, dtype, out_sharding=spec)
    else:
        # Auto axes: a bare PartitionSpec is refused by the initializers; outside jit give
        # them the concrete mesh, inside jit a sharding constraint (nothing materializes).
        try:
            value = init(
                key, shape, dtype, out_sharding=NamedSharding(jax.sharding.get_mesh(), spec)
            )
        except ValueError:  # get_mesh() inside jit: only the abstract mesh exists
            value = jax.lax.with_sharding_constraint(init(key, shape, dtype), spec)
    return nnx.Param(value, out_sharding=spec, expert_axis=0)


def place(value: jax.Array, spec: PartitionSpec) -> jax.Array:
    """Puts `value` on the current mesh with `spec` (a no-op when it already is).

    jax.shard_map insists that Explicit-axis inputs already carry its in_specs; Auto axes
    take a sharding constraint instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(value, spec)
    return jax.lax.with_sharding_constraint(value, spec)
