"""Running a sparse layer's forward expert-parallel on the current mesh (jax.shard_map).

A layer writes its forward once, for the tokens of one device:

    forward(layer, inputs, exchange) -> (y, aux)

`inputs` maps names to batch-major arrays ([B, ...]: this device's examples); `exchange`
(an Exchange, parallel/exchange.py) moves tokens between the devices that route them and
the devices that hold their experts, and sums the routing statistics over all devices.
`run` calls the forward directly outside a mesh (the exchange then moves nothing) and
inside jax.shard_map on one. This module knows no layer: it only splits a layer's state
into the per-expert parameters it names (placed on 'expert') and the rest (replicated).

Shape legend (per device): B batch, N tokens, D d_model, E experts, n size of the 'expert'
mesh axis, E_loc = E / n experts held here, G routing groups, C capacity, X row width.

Placement: tokens are split over the batch axes (data, fsdp and expert, so that every
device routes different tokens); experts over 'expert' (device i of that axis holds
experts [i * E_loc, (i + 1) * E_loc)); everything else is replicated. Expert weights never
move: tokens do (an all-to-all of slots, a ring of all-gather and reduce-scatter, or a
ragged all-to-all; the exchange chooses). Routing statistics are sums over tokens;
psum'ed over the batch axes and finalized once, they give the aux losses and metrics of
the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from multitask_moe.parallel.exchange import LOCAL, Exchange
from multitask_moe.parallel.mesh import (
    EXPERT_AXIS,
    batch_axes,
    check_batch_divisible,
    expert_axis_size,
)
from multitask_moe.parallel.sharding import place, shards_experts

Forward = Callable[[nnx.Module, dict[str, jax.Array], Exchange], tuple[jax.Array, dict]]


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh layers run expert-parallel on, or None for the one-device path.

    None outside jax.set_mesh and inside a shard_map that already made some axes manual
    (the caller is then doing its own partitioning). A one-device mesh still runs under
    shard_map: its arrays carry (trivial) explicit shardings that some ops inside the
    layers would otherwise have to be told about one by one.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return None
    return mesh


def run(
    layer: nnx.Module,
    forward: Forward,
    expert_params: frozenset[tuple[str, ...]],
    inputs: Mapping[str, jax.Array | None],
    *,
    exchange: str = "all_to_all",
    replicate_indivisible: bool = False,
) -> tuple[jax.Array, dict]:
    """forward(layer, inputs, exchange) on one device, or expert-parallel on the mesh.

    expert_params: paths inside the layer of its per-expert [E, ...] parameters.
    inputs: batch-major arrays (None entries are left out); y comes back batch-major and
    aux replicated (the forward must pass its statistics through exchange.total).
    replicate_indivisible: experts whose count does not divide the 'expert' axis are
      replicated (every device runs all of them on its own tokens; no all-to-all)
      instead of raising.
    Raises ValueError when the experts or the batch do not split over the mesh.
    """
    inputs = {name: value for name, value in inputs.items() if value is not None}
    mesh = active_mesh()
    if mesh is None:
        return forward(layer, inputs, LOCAL)
    is_expert = lambda path, _: tuple(str(part) for part in path) in expert_params
    graphdef, experts, rest = nnx.split(layer, is_expert, ...)
    shapes = [leaf.shape for leaf in jax.tree.leaves(experts)]
    if len(shapes) != len(expert_params):
        raise ValueError(
            f"{type(layer).__name__} has no parameters at {sorted(expert_params)}; "
            "cannot place its experts on the mesh"
        )
    sharded = shards_experts(shapes[0][0], mesh, replicate_indivisible=replicate_indivisible)
    check_batch_divisible(next(iter(inputs.values())).shape[0], mesh)
    axes = batch_axes(mesh)
    batch_spec = PartitionSpec(axes or None)
    expert_spec = PartitionSpec(EXPERT_AXIS if sharded else None)
    experts = jax.tree.map(lambda v: place(v, expert_spec), experts)
    rest = jax.tree.map(lambda v: place(v, PartitionSpec()), rest)
    inputs = {name: place(value, batch_spec) for name, value in inputs.items()}
    exchange = Exchange(expert_axis_size(mesh) if sharded else 1, axes, exchange)

    def body(experts, rest, inputs):
        return forward(nnx.merge(graphdef, experts, rest), inputs, exchange)

    return jax.shard_map(
        body,
        in_specs=(expert_spec, PartitionSpec(), batch_spec),
        out_specs=(batch_spec, PartitionSpec()),
    )(experts, rest, inputs)
