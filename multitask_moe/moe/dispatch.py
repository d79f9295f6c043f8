"""Token movement: tokens -> expert slot rows (dispatch) and back (combine).

Two implementations of one interface, giving the same numbers from the same Plan:
  "index": gathers through the plan's index maps (default). Memory O(R * D).
  "einsum": one-hot [G, S, R] dispatch and combine tensors contracted by einsum (the
    GShard / V-MoE formulation; dense ops that tile well on TPU, the benchmark baseline).

Shape legend: see plan.py (G groups, S tokens per group, R slot rows, J choices, D d_model).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from multitask_moe.moe.plan import Plan

DISPATCH_KINDS = ("index", "einsum")


@jax.custom_vjp
def take_rows(source: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """source [N, D], index [M] (>= N reads zeros) -> [M, D].

  `inverse` [J, N] lists, for each source row, the (up to J) output rows that read it
  (>= M for none). With it the backward pass is a gather too: XLA's CPU and GPU scatters
  serialize on colliding rows, and every token is read by K slot rows.
  """
  return jnp.take(source, index, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(source, index, inverse):
  return take_rows(source, index, inverse), (index, inverse)


def _take_rows_bwd(residuals, cotangent):
  index, inverse = residuals
  # d source[n] = sum over readers j of cotangent[inverse[j, n]]
  gathered = jnp.take(cotangent, inverse, axis=0, mode="fill", fill_value=0)  # [J, N, D]
  return jnp.sum(gathered, axis=0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dispatch(x: jax.Array, plan: Plan, kind: str = "index") -> jax.Array:
  """x [G, S, D] -> slot rows [G, R, D] (zeros in empty rows)."""
  if kind == "index":
    return jax.vmap(take_rows)(x, plan.row_token, plan.token_rows)
  if kind == "einsum":
    return jnp.einsum("gsd,gsr->grd", x, _dispatch_mask(plan, x.dtype))
  raise ValueError(f"dispatch={kind!r} is not allowed; allowed: {DISPATCH_KINDS}")


def combine(rows: jax.Array, plan: Plan, kind: str = "index") -> jax.Array:
  """Expert outputs [G, R, D] -> tokens [G, S, D]: sum over choices of gate * output."""
  num_groups, num_choices, group_size = plan.token_rows.shape
  gates = plan.token_gates.astype(rows.dtype)
  if kind == "index":
    readers = plan.row_assign[:, None, :]  # [G, 1, R]: each row is read by one choice
    flat_rows = plan.token_rows.reshape(num_groups, num_choices * group_size)
    picked = jax.vmap(take_rows)(rows, flat_rows, readers)  # [G, J * S, D]
    picked = picked.reshape(num_groups, num_choices, group_size, -1)
    return jnp.einsum("gjsd,gjs->gsd", picked, gates)
  if kind == "einsum":
    one_hot = jax.nn.one_hot(plan.token_rows, plan.num_rows, dtype=rows.dtype)  # [G,J,S,R]
    combine_weights = jnp.einsum("gjsr,gjs->gsr", one_hot, gates)
    return jnp.einsum("grd,gsr->gsd", rows, combine_weights)
  raise ValueError(f"dispatch={kind!r} is not allowed; allowed: {DISPATCH_KINDS}")


def _dispatch_mask(plan: Plan, dtype) -> jax.Array:
  """[G, S, R] one-hot: 1 where token s fills row r."""
  one_hot = jax.nn.one_hot(plan.token_rows, plan.num_rows, dtype=dtype)  # [G, J, S, R]
  return jnp.sum(one_hot, axis=1)


def run_blocks(
    rows: jax.Array,
    plan: Plan,
    expert_fn: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
  """Dropless layout: rows [R, D] in blocks of one expert each -> expert outputs [R, D].

  A scan over blocks, each one [block, D] x [D, H] matmul pair with that block's expert
  weights sliced in place (the weights are never gathered per block). Empty trailing
  blocks of the static bound are skipped by a cond, so padding costs at most one partial
  block per expert.
  """
  block = plan.block_size
  blocks = rows.reshape(-1, block, rows.shape[-1])  # [NB, B, D]

  def step(_, block_input):
    x_block, expert, used = block_input
    y_block = jax.lax.cond(
        used, partial(expert_fn, expert=expert), jnp.zeros_like, x_block)
    return None, y_block

  _, out = jax.lax.scan(step, None, (blocks, plan.block_expert, plan.block_used))
  return out.reshape(rows.shape)
