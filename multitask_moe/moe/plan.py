"""From router logits to a dispatch plan: which token goes to which expert slot.

Shape legend (as in V-MoE):
  G routing groups, S tokens per group, E experts, K experts chosen per token (top_k),
  C capacity (slots per expert per group), R slot rows per group, J choices per token
  (J = K for token choice, J = E for expert choice: expert e is "choice" e of a token).

A plan is the one interface between routing and token movement. Slot rows are laid out
expert-major: with capacity, R = E * C and row r belongs to expert r // C; in the dropless
layout rows are sorted by expert and padded per expert to whole blocks. Two index maps,
each the inverse of the other, let both directions of dispatch and combine be gathers
(see dispatch.py):
  row_assign [G, R]: j * S + s for the (choice j, token s) in row r; J * S if empty.
  token_rows [G, J, S]: the row of token s's choice j; R if dropped or not chosen.
  token_gates [G, J, S]: that choice's gate, 0 if dropped or not chosen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Plan:
    row_assign: jax.Array  # [G, R] int32
    token_rows: jax.Array  # [G, J, S] int32
    token_gates: jax.Array  # [G, J, S] float32
    kept: jax.Array  # [G, S, E] float32: 1 where token s is processed by expert e
    chosen: jax.Array  # [G, S, E] float32: 1 where the router picked e for s (before capacity)
    # Dropless layout only: expert e owns blocks [block_bounds[e], block_bounds[e + 1]) of
    # `block_size` rows; blocks past block_bounds[E] (the static bound's slack) are empty.
    block_bounds: jax.Array | None = None  # [E + 1] int32
    # Dropless layout only: the expert of each choice, E for padding (what the ring and
    # ragged exchanges send to the devices holding the experts).
    token_experts: jax.Array | None = None  # [G, K, S] int32
    capacity: int = struct.field(pytree_node=False, default=0)
    block_size: int = struct.field(pytree_node=False, default=0)

    @property
    def sorted_blocks(self) -> bool:
        """True for the dropless layout (rows sorted by expert in blocks), False for slots."""
        return self.block_size > 0

    @property
    def num_rows(self) -> int:
        return self.row_assign.shape[-1]

    @property
    def row_token(self) -> jax.Array:
        """[G, R]: the token in each row; S for an empty row (gathers read zeros there)."""
        num_choices, group_size = self.token_rows.shape[1:]
        empty = self.row_assign >= num_choices * group_size
        return jnp.where(empty, group_size, self.row_assign % group_size)

    @property
    def row_gate(self) -> jax.Array:
        """[G, R]: the gate of the choice in each row; 0 for an empty row."""
        num_groups, num_choices, group_size = self.token_rows.shape
        flat_gates = self.token_gates.reshape(num_groups, num_choices * group_size)
        return jnp.take_along_axis(flat_gates, self.row_assign, axis=1, mode="fill", fill_value=0)


def capacity(capacity_factor: float, group_size: int, top_k: int, num_experts: int) -> int:
    """C = ceil(cf * tokens_per_group * K / E), at least 1 and at most tokens_per_group."""
    slots = math.ceil(capacity_factor * group_size * top_k / num_experts)
    return max(1, min(slots, group_size))


def token_choice(
    probs: jax.Array,
    top_k: int,
    capacity: int,
    *,
    batch_priority: bool = False,
    renormalize: bool = False,
    valid: jax.Array | None = None,
) -> Plan:
    """Each token picks its top-k experts; each expert keeps its first C assignments.

    probs [G, S, E] float32. Priority is k-major (every token's first choice before any
    second choice, as in GShard/V-MoE) and, within a rank, token order, or the token's top
    gate descending with batch_priority (BPR, Riquelme et al. 2021). valid [G, S] bool:
    tokens marked False (padding) choose nothing and take no slot.
    """
    num_groups, group_size, num_experts = probs.shape
    gates, experts = jax.lax.top_k(probs, top_k)  # [G, S, K]
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    experts_ks = experts.transpose(0, 2, 1)  # [G, K, S] k-major
    valid_ks = _valid_choices(valid, experts_ks.shape)  # [G, K, S]
    # Padding "chooses" expert E: its one-hot row is empty, so it moves no position.
    counted_ks = jnp.where(valid_ks, experts_ks, num_experts)
    if batch_priority:
        top_gate = jnp.where(valid_ks[:, 0], gates[..., 0], -1.0)  # padding last
        order = jnp.argsort(-top_gate, axis=1, stable=True)  # [G, S] priority -> token
        by_priority = jnp.take_along_axis(counted_ks, order[:, None, :], axis=2)  # [G, K, S]
    else:
        by_priority = counted_ks
    position = _position_in_expert(by_priority.reshape(num_groups, top_k * group_size), num_experts)
    position = position.reshape(num_groups, top_k, group_size)  # [G, K, S] in priority order
    if batch_priority:
        # Back to token order: the token at priority p is order[p].
        rank_of_token = jnp.argsort(order, axis=1)  # [G, S]
        position = jnp.take_along_axis(position, rank_of_token[:, None, :], axis=2)
    is_kept = (position < capacity) & valid_ks
    num_rows = num_experts * capacity
    token_rows = jnp.where(is_kept, experts_ks * capacity + position, num_rows)
    token_gates = jnp.where(is_kept, gates.transpose(0, 2, 1), 0.0)
    return Plan(
        row_assign=_invert(token_rows, num_rows),
        token_rows=token_rows.astype(jnp.int32),
        token_gates=token_gates,
        kept=_choice_mask(experts_ks, is_kept, num_experts),
        chosen=_choice_mask(experts_ks, valid_ks, num_experts),
        capacity=capacity,
    )


def expert_choice(probs: jax.Array, capacity: int, valid: jax.Array | None = None) -> Plan:
    """Each expert picks the C tokens of its group it has the highest probability for.

    probs [G, S, E] (softmax over experts, Zhou et al. 2022). Every expert fills exactly C
    slots; a token gets 0..E experts. Choice j of a token is expert j (J = E). valid [G, S]
    bool: padding is never picked; an expert's slots beyond the group's real tokens stay
    empty.
    """
    num_groups, group_size, num_experts = probs.shape
    if valid is not None:
        probs = jnp.where(valid[..., None], probs, -1.0)  # below every real probability
    gates, tokens = jax.lax.top_k(probs.transpose(0, 2, 1), capacity)  # [G, E, C]
    num_rows = num_experts * capacity
    picked = gates >= 0  # [G, E, C]: False only for a slot that could find no real token
    slot = jnp.where(picked, jnp.arange(num_rows).reshape(num_experts, capacity), num_rows)
    row_assign = jnp.where(
        picked, jnp.arange(num_experts)[:, None] * group_size + tokens, num_experts * group_size
    )  # [G, E, C]
    token_rows = jnp.full((num_groups, num_experts, group_size), num_rows, jnp.int32)
    # An empty slot writes past the end (dropped), so it never marks a padding token.
    token_rows = jax.vmap(
        lambda tr, tok, sl: tr.at[jnp.arange(num_experts)[:, None], tok].set(sl, mode="drop")
    )(token_rows, jnp.where(picked, tokens, group_size), slot)
    kept = (token_rows < num_rows).transpose(0, 2, 1).astype(jnp.float32)  # [G, S, E]
    token_gates = jnp.where(token_rows < num_rows, probs.transpose(0, 2, 1), 0.0)
    return Plan(
        row_assign=row_assign.reshape(num_groups, num_rows).astype(jnp.int32),
        token_rows=token_rows,
        token_gates=token_gates,
        kept=kept,
        chosen=kept,
        capacity=capacity,
    )


def dropless_token_choice(
    probs: jax.Array,
    top_k: int,
    block_size: int,
    *,
    renormalize: bool = False,
    valid: jax.Array | None = None,
) -> Plan:
    """Token choice with no capacity: every assignment is kept.

    Groups do not matter without capacity, so all G * S tokens form one group. Rows are
    sorted by expert and each expert's run is padded to whole blocks of `block_size`, so a
    block belongs to one expert and the experts run as one matmul per block. The static
    row bound is A + E * (block_size - 1) rounded up to a block (A = G * S * K), never the
    A * E of a [tokens, experts, capacity] layout. valid [G, S] bool: padding gets no row.
    """
    experts_ks, gates_ks = top_k_choices(probs, top_k, renormalize=renormalize, valid=valid)
    return dropless_assignments(experts_ks, gates_ks, probs.shape[-1], block_size)


def top_k_choices(
    probs: jax.Array,
    top_k: int,
    *,
    renormalize: bool = False,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Every token's top-k: probs [G, S, E], valid [G, S] bool or None -> (experts_ks
    [1, K, N] int32, E for a padding token's choices; gates_ks [1, K, N] float32), N = G * S.
    """
    num_groups, group_size, num_experts = probs.shape
    num_tokens = num_groups * group_size
    probs = probs.reshape(1, num_tokens, num_experts)
    gates, experts = jax.lax.top_k(probs, top_k)  # [1, N, K]
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    experts_ks = experts.transpose(0, 2, 1)  # [1, K, N]
    valid_ks = _valid_choices(
        None if valid is None else valid.reshape(1, num_tokens), experts_ks.shape
    )  # [1, K, N]
    # Padding counts as expert E: no position, no row (its one-hot row is empty).
    return jnp.where(valid_ks, experts_ks, num_experts), gates.transpose(0, 2, 1)


def dropless_assignments(
    experts_ks: jax.Array, gates_ks: jax.Array, num_experts: int, block_size: int
) -> Plan:
    """The dropless layout of given choices: experts_ks [1, K, N] int (>= num_experts: no
    expert, the choice gets no row), gates_ks [1, K, N] float32.

    The ring exchange uses it directly: the choices of every device of an 'expert' group,
    with the experts held elsewhere marked as none.
    """
    _, top_k, num_tokens = experts_ks.shape
    valid_ks = experts_ks < num_experts
    flat_experts = jnp.where(valid_ks, experts_ks, num_experts).reshape(1, top_k * num_tokens)
    position = _position_in_expert(flat_experts, num_experts)[0]  # [A]
    counts = jnp.sum(jax.nn.one_hot(flat_experts[0], num_experts, dtype=jnp.int32), axis=0)
    padded = -(-counts // block_size) * block_size  # [E]
    ends = jnp.cumsum(padded)  # [E]
    starts = ends - padded
    bound = top_k * num_tokens + num_experts * (block_size - 1)
    num_blocks = -(-bound // block_size)
    num_rows = num_blocks * block_size
    token_rows = (
        jnp.take(starts, flat_experts[0], mode="fill", fill_value=num_rows) + position
    ).reshape(1, top_k, num_tokens)
    token_rows = jnp.where(valid_ks, token_rows, num_rows)
    block_bounds = jnp.concatenate([jnp.zeros(1, ends.dtype), ends]) // block_size
    every_choice = _choice_mask(experts_ks, valid_ks, num_experts)  # nothing is dropped
    return Plan(
        row_assign=_invert(token_rows, num_rows),
        token_rows=token_rows.astype(jnp.int32),
        token_gates=jnp.where(valid_ks, gates_ks, 0.0),
        kept=every_choice,
        chosen=every_choice,
        block_bounds=block_bounds.astype(jnp.int32),
        token_experts=jnp.where(valid_ks, experts_ks, num_experts).astype(jnp.int32),
        block_size=block_size,
    )


def _valid_choices(valid: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """valid [G, S] (None: all) -> [G, J, S] bool, the same for every choice of a token."""
    if valid is None:
        return jnp.ones(shape, bool)
    return jnp.broadcast_to(valid[:, None, :], shape)


def _position_in_expert(experts: jax.Array, num_experts: int) -> jax.Array:
    """experts [G, A] -> [G, A]: how many earlier assignments of the group chose the same
    expert (an index >= num_experts chooses none and counts for none). A cumulative sum of
    one-hots is O(A * E) but a plain scan XLA vectorizes; E is small next to A."""
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [G, A, E]
    before = jnp.cumsum(one_hot, axis=1) - one_hot
    return jnp.sum(before * one_hot, axis=-1)


def _invert(token_rows: jax.Array, num_rows: int) -> jax.Array:
    """token_rows [G, J, S] (num_rows = dropped) -> row_assign [G, R] (J * S = empty)."""
    num_groups, num_choices, group_size = token_rows.shape
    flat = token_rows.reshape(num_groups, num_choices * group_size)
    source = jnp.arange(num_choices * group_size, dtype=jnp.int32)
    empty = jnp.full((num_groups, num_rows), num_choices * group_size, jnp.int32)
    # Dropped assignments point past the end and are discarded by mode="drop".
    return jax.vmap(lambda e, rows: e.at[rows].set(source, mode="drop"))(empty, flat)


def _choice_mask(experts_ks: jax.Array, keep: jax.Array, num_experts: int) -> jax.Array:
    """experts [G, J, S] and keep [G, J, S] -> [G, S, E] 0/1 float32."""
    one_hot = jax.nn.one_hot(experts_ks, num_experts, dtype=jnp.float32)  # [G, J, S, E]
    return jnp.sum(one_hot * keep[..., None], axis=1)
