"""Expert parallelism: the MoE and MoA layers on a device mesh, written with jax.shard_map.

Shape legend (per device unless marked global): B batch, L length, N = B * L tokens,
D d_model, E experts, K top_k, n size of the 'expert' mesh axis, E_loc = E / n experts
held here, G routing groups of S tokens, C capacity (slots per expert per group),
H head_dim (MoA).

Placement: tokens are split over the batch axes (data, fsdp and expert, so that every
device routes different tokens); experts over 'expert' (device i of that axis holds
experts [i * E_loc, (i + 1) * E_loc)); everything else is replicated.

MoE forward on each device, with the routing code of the single-device layer:
  router -> plan over the local groups -> dispatch to slots [G, E, C, D]
  -> all_to_all over 'expert' (split E into n chunks, stack the sources on G)
  -> [n * G, E_loc, C, D]: the slots of this device's experts from every device
  -> local expert matmuls -> all_to_all back -> [G, E, C, D] -> combine.
Expert weights never move. The router statistics are sums over tokens
(losses.router_stats); they are psum'ed over the batch axes and finalized once, so the
aux losses and metrics are those of the global batch.

Routing groups never straddle devices: capacity is counted per group, and a group split
over devices would need a global prefix count. So the per-device token count must be a
multiple of group_size (ValueError otherwise); the default, one group per sequence, always
is. Dropless routing, and expert choice without a capacity factor, do not depend on the
grouping.

Dropless across devices (capacity_factor=None): a token picks each expert at most once,
so an expert receives at most S tokens of a group. Capacity slots with C = S are thus a
static bound that can never overflow: no token is ever dropped, and the result is the
exact sparse sum. The price is that the all-to-alls and expert matmuls carry E / K times
the rows of a ragged exchange. No static bound does better while E_loc <= K (a device
can receive all S tokens of a group for each of its experts); jax.lax.ragged_all_to_all
would remove the padding on GPU/TPU, but it has no CPU lowering and every sharded path
here is tested on CPU.

MoA: attention experts own w_query and w_out; the shared key/value projection and the
attention itself stay with the tokens. Token rows go to the expert devices for the query
projection and back (2 all-to-alls), attend locally, then the heads go out for the
output projection and back (2 more).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from multitask_moe.moe import dispatch as dispatch_lib
from multitask_moe.moe import losses
from multitask_moe.moe import plan as plan_lib
from multitask_moe.parallel.mesh import (
    EXPERT_AXIS,
    batch_axes,
    check_batch_divisible,
    check_experts_divisible,
    expert_axis_size,
)
from multitask_moe.parallel.sharding import place

# Per-expert parameters of each layer, by their path inside the layer. Everything else
# (routers, shared experts, MoA's key/value projection) is replicated.
MOE_EXPERT_PARAMS = frozenset({("experts", "w_in"), ("experts", "w_out")})
MOA_EXPERT_PARAMS = frozenset({("w_query",), ("w_out",)})


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh the layers should run expert-parallel on, or None for the plain path.

    None outside jax.set_mesh, on a one-device mesh, and inside a shard_map that already
    made some axes manual (the caller is then doing its own partitioning).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def _expert_spec(mesh) -> PartitionSpec:
    """Leading (expert) axis split over 'expert'; replicated on a mesh without one."""
    return PartitionSpec(EXPERT_AXIS if EXPERT_AXIS in mesh.axis_names else None)


def _split_layer(layer: nnx.Module, expert_params: frozenset, mesh):
    """-> graphdef, expert state (placed on 'expert'), rest (placed replicated)."""
    is_expert = lambda path, _: tuple(str(part) for part in path) in expert_params
    graphdef, experts, rest = nnx.split(layer, is_expert, ...)
    if len(jax.tree.leaves(experts)) != len(expert_params):
        raise ValueError(
            f"{type(layer).__name__} has no parameters at {sorted(expert_params)}"
            "; the expert-parallel path does not know this layer's structure"
        )
    experts = jax.tree.map(lambda v: place(v, _expert_spec(mesh)), experts)
    rest = jax.tree.map(lambda v: place(v, PartitionSpec()), rest)
    return graphdef, experts, rest


def _shard_index(axes: tuple[str, ...]) -> jax.Array:
    """Linear index of this device's batch shard (the order PartitionSpec(axes) uses)."""
    index = jnp.zeros((), jnp.int32)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index


def _local_rows(full: jax.Array, axes: tuple[str, ...], count: int) -> jax.Array:
    """This shard's `count` leading rows of a replicated array [shards * count, ...]."""
    return jax.lax.dynamic_slice_in_dim(full, _shard_index(axes) * count, count, axis=0)


def _router_noise(router, shape: tuple[int, ...], deterministic: bool) -> jax.Array | None:
    """The router's training noise, drawn for the global logits shape outside shard_map.

    Drawing it per shard inside would give each device the same stream; drawing the
    global array once (as the plain layer does) gives every token the value it gets on
    one device. Replicated: [G, S, E] floats are small next to the [N, D] activations.
    """
    if router.noise_std <= 0 or deterministic:
        return None
    return jax.random.normal(router.noise_rngs(), shape, jnp.float32)


def _exchange(slots: jax.Array, num_shards: int, *, back: bool = False) -> jax.Array:
    """The expert all-to-all. Out: [G, E, C, X] -> [n * G, E_loc, C, X]; back: inverse."""
    if num_shards == 1:
        return slots
    if back:
        return jax.lax.all_to_all(slots, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)
    return jax.lax.all_to_all(slots, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)


def _routing_group_size(layer, batch: int, length: int, shards: int) -> int:
    """Tokens per routing group on one device; ValueError if a group would straddle."""
    group_size = layer.routing_group_size(batch, length)  # checks the global batch
    local_tokens = batch // shards * length
    if local_tokens % group_size:
        raise ValueError(
            f"group_size={layer.group_size} does not divide the {local_tokens} tokens per "
            f"device (batch / {shards} shards x length); routing groups may not straddle "
            f"devices"
        )
    return group_size


def _moe_plan(layer, probs: jax.Array, deterministic: bool, valid) -> plan_lib.Plan:
    """The layer's own plan, except that dropless token choice uses C = S slots (see the
    module docstring) instead of the single-device sorted-block layout."""
    if layer.kind.choice == "tokens" and layer.capacity(probs.shape[1], deterministic) is None:
        return plan_lib.token_choice(
            probs,
            layer.top_k,
            probs.shape[1],
            batch_priority=layer.batch_priority,
            renormalize=layer.renormalize_gates,
            valid=valid,
        )
    return layer.make_plan(probs, deterministic, valid)


def _check_layout(mesh, num_experts: int, batch: int) -> tuple[tuple[str, ...], int, int]:
    """-> batch axes, batch shards, 'expert' axis size; ValueError on what does not divide."""
    check_experts_divisible(num_experts, mesh)
    check_batch_divisible(batch, mesh)
    axes = batch_axes(mesh)
    return axes, math.prod(mesh.shape[a] for a in axes), expert_axis_size(mesh)


def _checked_task_ids(layer, task_ids, batch: int) -> jax.Array | None:
    """The plain layer's task-id checks (layer.token_task_ids) -> [B] int32 or None.

    The ids stay per example: they are expanded to tokens inside each shard, because
    expanding a batch-sharded array needs an explicit output sharding. The value range is
    checked when the ids are concrete and on this host, as in the plain layer.
    """
    from multitask_moe.moe.layer import token_task_ids

    stand_in = None
    if task_ids is not None:
        task_ids = jnp.asarray(task_ids)
        concrete = not isinstance(task_ids, jax.core.Tracer) and task_ids.is_fully_addressable
        stand_in = np.asarray(task_ids) if concrete else np.zeros(task_ids.shape, task_ids.dtype)
    if (
        token_task_ids(stand_in, batch, 1, layer.num_tasks, layer.routing, layer.kind.needs_tasks)
        is None
    ):
        return None
    return task_ids.astype(jnp.int32)


def _shard_inputs(batch_spec, noise, **batched):
    """Inputs of the shard_map body and their specs: batch-major arrays split over the
    batch axes, the router noise (if any) replicated; None entries left out."""
    inputs = {
        name: place(value, batch_spec) for name, value in batched.items() if value is not None
    }
    specs = {name: batch_spec for name in inputs}
    if noise is not None:
        inputs["noise"], specs["noise"] = place(noise, PartitionSpec()), PartitionSpec()
    return inputs, specs


def moe_forward(layer, x: jax.Array, task_ids, mask, deterministic: bool):
    """Expert-parallel MoE.__call__ on the current mesh: x [B, L, D], mask [B, L] or None
    -> (y, aux)."""
    from multitask_moe.moe.layer import _check_input

    mesh = jax.sharding.get_abstract_mesh()
    batch, length = _check_input(x, layer.d_model)
    axes, shards, num_expert_shards = _check_layout(mesh, layer.num_experts, batch)
    local_batch = batch // shards
    local_tokens = local_batch * length
    group_size = _routing_group_size(layer, batch, length, shards)
    task_ids = _checked_task_ids(layer, task_ids, batch)  # [B] or None
    global_groups = batch * length // layer.routing_group_size(batch, length)
    noise = _router_noise(
        layer.router,
        (global_groups, batch * length // global_groups, layer.num_experts),
        deterministic,
    )
    batch_spec = PartitionSpec(axes or None)
    inputs, specs = _shard_inputs(batch_spec, noise, x=x, tasks=task_ids, mask=mask)
    graphdef, experts, rest = _split_layer(layer, MOE_EXPERT_PARAMS, mesh)
    d_model = layer.d_model

    def body(experts, rest, inputs):
        local = nnx.merge(graphdef, experts, rest)  # experts: this device's E_loc
        x_local = inputs["x"]  # [B_loc, L, D]
        groups = x_local.reshape(local_tokens // group_size, group_size, d_model)  # [G,S,D]
        token_tasks = (
            jnp.repeat(inputs["tasks"], length)  # [N_loc]
            if "tasks" in inputs
            else None
        )
        group_tasks = None if token_tasks is None else token_tasks.reshape(groups.shape[:2])
        mask_local = inputs.get("mask")  # [B_loc, L] or None
        valid = None if mask_local is None else mask_local.reshape(groups.shape[:2])  # [G, S]
        logits = local.router(groups, group_tasks, deterministic=True)  # [G, S, E] f32
        if "noise" in inputs:
            noise = inputs["noise"].reshape(batch * length, -1)
            logits = logits + local.router.noise_std * _local_rows(
                noise, axes, local_tokens
            ).reshape(logits.shape)
        probs = jax.nn.softmax(logits, axis=-1)
        plan = _moe_plan(local, probs, deterministic, valid)
        # The single-device token movement, with the expert all-to-all around the experts.
        y = local.move_tokens(
            groups.astype(local.dtype),
            plan,
            exchange=lambda slots, back: _exchange(slots, num_expert_shards, back=back),
        )
        stats = local.routing_stats(logits, probs, plan, token_tasks, valid)
        stats = jax.lax.psum(stats, axes) if axes else stats
        aux = losses.aux_from_stats(stats, choice=local.kind.choice)
        y = local.add_shared_experts(y.reshape(local_batch, length, d_model), x_local, mask_local)
        return y.astype(local.dtype), aux

    return jax.shard_map(
        body,
        in_specs=(_expert_spec(mesh), PartitionSpec(), specs),
        out_specs=(batch_spec, PartitionSpec()),
    )(experts, rest, inputs)


def moa_forward(layer, x: jax.Array, task_ids, mask, deterministic: bool):
    """Expert-parallel MoA.__call__ on the current mesh: x [B, L, D] -> (y, aux)."""
    from multitask_moe.moe.attention import attend
    from multitask_moe.moe.layer import _check_input

    mesh = jax.sharding.get_abstract_mesh()
    batch, length = _check_input(x, layer.d_model)
    axes, shards, num_expert_shards = _check_layout(mesh, layer.num_experts, batch)
    local_batch = batch // shards
    local_tokens = local_batch * length
    task_ids = _checked_task_ids(layer, task_ids, batch)  # [B] or None
    if mask is not None and jnp.shape(mask) != (batch, length):
        layer._allowed(mask, batch, length)  # raises the plain layer's ValueError
    noise = _router_noise(layer.router, (batch, length, layer.num_experts), deterministic)
    batch_spec = PartitionSpec(axes or None)
    inputs, specs = _shard_inputs(batch_spec, noise, x=x, tasks=task_ids, mask=mask)
    graphdef, experts, rest = _split_layer(layer, MOA_EXPERT_PARAMS, mesh)
    num_experts, d_model, head_dim = layer.num_experts, layer.d_model, layer.head_dim

    def body(experts, rest, inputs):
        local = nnx.merge(graphdef, experts, rest)  # w_query, w_out: this device's E_loc
        dtype = local.dtype
        x_local = inputs["x"].astype(dtype)  # [B_loc, L, D]
        token_tasks = (
            jnp.repeat(inputs["tasks"], length)  # [N_loc]
            if "tasks" in inputs
            else None
        )
        logits = local.router(
            inputs["x"],
            None if token_tasks is None else token_tasks.reshape(local_batch, length),
            deterministic=True,
        )
        if "noise" in inputs:
            logits = logits + local.router.noise_std * _local_rows(
                inputs["noise"], axes, local_batch
            )
        probs = jax.nn.softmax(logits, axis=-1)  # [B_loc, L, E]
        # One group of all local tokens with C = N_loc: MoA never drops (see docstring).
        plan = plan_lib.token_choice(
            probs.reshape(1, local_tokens, num_experts),
            local.top_k,
            local_tokens,
            renormalize=local.renormalize_gates,
        )
        tokens = x_local.reshape(1, local_tokens, d_model)
        rows = dispatch_lib.dispatch(tokens, plan, "index")  # [1, E * C, D]
        slots = _exchange(
            rows.reshape(1, num_experts, local_tokens, d_model), num_expert_shards
        )  # [n, E_loc, C, D]
        queries = jnp.einsum("gecd,edh->gech", slots, local.w_query[...].astype(dtype))
        queries = _exchange(queries, num_expert_shards, back=True)  # [1, E, C, H]
        queries = _per_choice(queries.reshape(-1, head_dim), plan)  # [K, N_loc, H]
        queries = queries.reshape(local.top_k, local_batch, length, head_dim)
        keys, values = jnp.split(x_local @ local.w_kv[...].astype(dtype), 2, axis=-1)
        allowed = local._allowed(inputs.get("mask"), local_batch, length)  # [B_loc, L, M]
        heads = attend(
            queries.transpose(1, 2, 0, 3), keys, values, allowed, head_dim, dtype
        )  # [B_loc, L, K, H]
        head_rows = _rows_of_choices(heads.transpose(2, 0, 1, 3).reshape(-1, head_dim), plan)
        head_slots = _exchange(
            head_rows.reshape(1, num_experts, local_tokens, head_dim), num_expert_shards
        )  # [n, E_loc, C, H]
        out = jnp.einsum("gech,ehd->gecd", head_slots, local.w_out[...].astype(dtype))
        out = _exchange(out, num_expert_shards, back=True)  # [1, E, C, D]
        y = dispatch_lib.combine(out.reshape(1, -1, d_model), plan, "index")  # [1, N, D]

        flat = lambda a: a.reshape(local_tokens, -1)
        stats = losses.router_stats(
            flat(logits),
            flat(probs),
            flat(plan.chosen[0]),
            flat(plan.chosen[0]),
            token_tasks,
            local.num_tasks,
        )
        stats = jax.lax.psum(stats, axes) if axes else stats
        aux = losses.aux_from_stats(stats, choice="tokens")
        return y.reshape(local_batch, length, d_model).astype(dtype), aux

    return jax.shard_map(
        body,
        in_specs=(_expert_spec(mesh), PartitionSpec(), specs),
        out_specs=(batch_spec, PartitionSpec()),
    )(experts, rest, inputs)


def _per_choice(rows: jax.Array, plan: plan_lib.Plan) -> jax.Array:
    """Slot rows [R, X] -> each (choice, token)'s row [J, S, X], ungated (one group).

    Plain gathers (their gradient is a scatter-add): MoA's rows are head_dim wide, and
    the index maps come straight from the plan, whatever dispatch.py does internally.
    """
    return jnp.take(rows, plan.token_rows[0], axis=0, mode="fill", fill_value=0)


def _rows_of_choices(values: jax.Array, plan: plan_lib.Plan) -> jax.Array:
    """Per-(choice, token) values [J * S, X] -> slot rows [R, X] (zeros in empty rows)."""
    return jnp.take(values, plan.row_assign[0], axis=0, mode="fill", fill_value=0)
