"""Meshes, multi-host start-up, and expert-parallel dispatch.

    from multitask_moe import parallel
    parallel.initialize()                            # no-op on one process
    mesh = parallel.make_mesh({"data": -1, "expert": 4})
    with jax.set_mesh(mesh):
        layer = mtm.MoE(...)                         # experts sharded over 'expert'
        y, aux = layer(x)                            # runs expert-parallel

Modules: mesh (axes, batch shardings, divisibility checks), distributed (multi-host
start-up), sharding (per-expert parameters placed at creation), expert_parallel (runs a
layer's one forward directly or inside shard_map, with the token Exchange; it knows no
layer), hlo (collectives in compiled HLO text, for tests and benchmarks).
"""

from multitask_moe.parallel.distributed import (
    DistributedInfo,
    detect_cluster,
    initialize,
    is_coordinator,
    process_position,
    share_from_coordinator,
)
from multitask_moe.parallel.mesh import (
    AXIS_NAMES,
    BATCH_AXIS_NAMES,
    EXPERT_AXIS,
    batch_axes,
    batch_sharding,
    batch_spec,
    check_batch_divisible,
    check_experts_divisible,
    current_mesh,
    expert_axis_size,
    make_mesh,
    num_batch_shards,
)

__all__ = [
    "AXIS_NAMES",
    "BATCH_AXIS_NAMES",
    "EXPERT_AXIS",
    "DistributedInfo",
    "batch_axes",
    "batch_sharding",
    "batch_spec",
    "check_batch_divisible",
    "check_experts_divisible",
    "current_mesh",
    "detect_cluster",
    "expert_axis_size",
    "initialize",
    "is_coordinator",
    "make_mesh",
    "num_batch_shards",
    "process_position",
    "share_from_coordinator",
]
