"""Dropless token choice across devices without slot padding: the ring and ragged exchanges.

Both start from the dropless plan of one device's tokens (plan.dropless_token_choice:
every choice kept, `token_experts` says which expert) and end with each token's weighted
sum of its experts' outputs, as the one-device layer computes it. Only the experts held on
this device ([shard * E_loc, (shard + 1) * E_loc) of the 'expert' axis) run here, on the
grouped matmul over rows sorted by expert (grouped.py), so no expert ever sees a padding
slot. See parallel/exchange.py for the collectives and their costs.

The ring routes the gathered tokens again on every device (Rerouting) instead of gathering
their choices: the router is replicated and a token's top-k depends only on the token and
its task, so recomputing it costs N x D x E flops and keeps 2 K values per token off the
links (1.6% of the ring's bytes at d_model 128). What crosses besides the tokens: one task
id per example when the routing reads tasks, and the padding mask when there is one.

Shape legend (per device): N tokens, D d_model, K top_k, E experts, E_loc experts here,
n size of the 'expert' axis, R rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from multitask_moe.moe import dispatch, plan
from multitask_moe.moe.experts import Experts
from multitask_moe.parallel.exchange import Exchange, RaggedLayout


@dataclasses.dataclass(frozen=True)
class Rerouting:
    """How a device routes the gathered tokens of its 'expert' group itself.

    choose: (tokens [M, D], token_tasks [M] int32 or None, valid [M] bool or None) ->
      (experts [M, K] int32, E where a token is padding; gates [M, K] float32), exactly
      as the layer routes them.
    example_tasks: this device's task ids [B] (None: the routing reads no task).
    valid: this device's padding mask [N] bool (None: no padding).
    """

    choose: Callable[..., tuple[jax.Array, jax.Array]]
    example_tasks: jax.Array | None = None
    valid: jax.Array | None = None

    def route(self, everyone: jax.Array, exchange: Exchange) -> tuple[jax.Array, jax.Array]:
        """everyone [n * N, D], the gathered tokens -> their (experts, gates) [n * N, K]."""
        tasks = None
        if self.example_tasks is not None:
            examples = exchange.gather(self.example_tasks)  # [n * B]
            tasks = jnp.repeat(examples, everyone.shape[0] // examples.shape[0])  # [n * N]
        valid = None if self.valid is None else exchange.gather(self.valid)  # [n * N]
        return self.choose(everyone, tasks, valid)


def ring(
    experts: Experts,
    tokens: jax.Array,
    routing: plan.Plan,
    exchange: Exchange,
    tile: int,
    rerouting: Rerouting | None = None,
) -> jax.Array:
    """tokens [N, D] -> routed output [N, D] through a ring of experts.

    The group's tokens are all-gathered and routed here (rerouting), or gathered with
    their choices from `routing` (no rerouting: the routing drew noise, or the tokens
    changed dtype on the way in); this device's experts run on the rows routed to them;
    the reduce-scatter adds every device's share of a token's output.
    """
    local = experts.w_in.shape[0]
    everyone = exchange.gather(tokens)  # [n * N, D]
    if rerouting is not None:
        choices, gates = rerouting.route(everyone, exchange)  # [n * N, K] each
    else:
        choices = exchange.gather(routing.token_experts[0].T)  # [n * N, K]
        gates = exchange.gather(routing.token_gates[0].T)  # [n * N, K]
    held = choices - exchange.expert_shard() * local
    held = jnp.where((held >= 0) & (held < local), held, local)  # local index, local = none
    rows_plan = plan.dropless_assignments(held.T[None], gates.T[None], local, tile)
    rows = dispatch.dispatch(everyone[None], rows_plan, "index")[0]  # [R, D]
    out = experts.grouped(rows, rows_plan.block_bounds * tile, tile)
    share = dispatch.combine(out[None], rows_plan, "index")[0]  # [n * N, D]: experts here
    return exchange.scatter_sum(share)


def ragged(
    experts: Experts, tokens: jax.Array, routing: plan.Plan, exchange: Exchange, tile: int
) -> jax.Array:
    """tokens [N, D] -> routed output [N, D] through two ragged all-to-alls.

    routing: the dropless plan with one-row blocks, so this device's rows are sorted by
    expert with no padding (R = K * N). Each run goes to its expert's device, which places
    every source's rows of one expert together (padded to whole tiles), runs its experts,
    and sends each run back to where it came from.
    """
    num_rows, d_model = routing.num_rows, tokens.shape[-1]
    counts = jnp.sum(routing.kept, axis=(0, 1)).astype(jnp.int32)  # [E]
    rows = dispatch.dispatch(tokens[None], routing, "index")[0]  # [K * N, D]
    layout = RaggedLayout.from_counts(exchange.gather(counts[None]), exchange.expert_shard(), tile)
    # Worst case every device routes all its rows here; each local run pads to a tile.
    local = experts.w_in.shape[0]
    capacity = -(-(exchange.expert_shards * num_rows + local * (tile - 1)) // tile) * tile
    arrived = exchange.send_ragged(
        rows,
        jnp.zeros((capacity, d_model), rows.dtype),
        layout.send_offsets,
        layout.send_sizes,
        layout.target_offsets,
        layout.recv_sizes,
    )  # [capacity, D]: runs of the experts here
    out = experts.grouped(arrived, layout.row_bounds, tile).astype(rows.dtype)
    returned = exchange.send_ragged(
        out,
        jnp.zeros_like(rows),
        layout.recv_offsets,
        layout.recv_sizes,
        layout.return_offsets,
        layout.send_sizes,
    )  # [K * N, D] in this device's sorted order
    return dispatch.combine(returned[None], routing, "index")[0]
