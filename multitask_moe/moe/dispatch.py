"""Token movement: tokens -> expert slot rows (dispatch) and back (combine).

Two implementations of one interface, giving the same numbers from the same Plan:
  "index": gathers through the plan's index maps (default). Memory O(R * D).
  "einsum": one-hot [G, S, R] dispatch and combine tensors contracted by einsum (the
    GShard / V-MoE formulation; dense ops that tile well on TPU, the benchmark baseline).

Shape legend: see plan.py (G groups, S tokens per group, R slot rows, J choices, D d_model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from multitask_moe.moe.plan import Plan

DISPATCH_KINDS = ("index", "einsum")


def _take(source: jax.Array, index: jax.Array) -> jax.Array:
    """source [N, D], index [...] -> [..., D]; indices >= N read zeros."""
    return jnp.take(source, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def take_rows(source: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """source [N, D], index [M] (>= N reads zeros) -> [M, D], row m = source[index[m]].

    `inverse` [J, N] lists, for each source row, the (up to J) output rows that read it
    (>= M for none), so the backward pass is a gather too: d source[n] = sum_j
    d out[inverse[j, n]]. Autodiff of a gather would scatter-add, which XLA's CPU and GPU
    backends serialize on colliding rows (in dispatch every token is read by K rows).
    """
    return _take(source, index)


def _take_rows_fwd(source, index, inverse):
    return take_rows(source, index, inverse), (index, inverse)


def _take_rows_bwd(residuals, d_out):
    _, inverse = residuals
    # One gather per reader, summed: XLA fuses each gather into the add, so no [J, N, D]
    # intermediate is written.
    d_source = _take(d_out, inverse[0])
    for j in range(1, inverse.shape[0]):
        d_source = d_source + _take(d_out, inverse[j])
    return d_source, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def combine_rows(
    rows: jax.Array,
    token_rows: jax.Array,
    token_gates: jax.Array,
    row_token: jax.Array,
    row_gate: jax.Array,
) -> jax.Array:
    """Combine of one group: rows [R, D] -> tokens [S, D], sum_j gate[j, s] * rows[token_rows].

    row_token [R] and row_gate [R] describe each row's reader, so d rows is a gather:
    d rows[r] = row_gate[r] * d tokens[row_token[r]].
    """
    out = token_gates[0][:, None] * _take(rows, token_rows[0])
    for j in range(1, token_rows.shape[0]):
        out = out + token_gates[j][:, None] * _take(rows, token_rows[j])
    return out


def _combine_rows_fwd(rows, token_rows, token_gates, row_token, row_gate):
    out = combine_rows(rows, token_rows, token_gates, row_token, row_gate)
    return out, (rows, token_rows, row_token, row_gate)


def _combine_rows_bwd(residuals, d_out):
    rows, token_rows, row_token, row_gate = residuals
    d_out_of_row = _take(d_out, row_token)  # [R, D]: each row's reader's cotangent
    d_rows = row_gate[:, None] * d_out_of_row
    # d gate[j, s] = <rows[token_rows[j, s]], d_out[s]>: computed per row from the gather
    # above, then moved to (j, s) as scalars, so the [R, D] rows are read only once more.
    d_gate_of_row = jnp.sum(rows * d_out_of_row, axis=-1)  # [R]
    d_gates = _take(d_gate_of_row[:, None], token_rows)[..., 0]  # [J, S]
    return d_rows, None, d_gates.astype(rows.dtype), None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def dispatch(x: jax.Array, plan: Plan, kind: str = "index") -> jax.Array:
    """x [G, S, D] -> slot rows [G, R, D] (zeros in empty rows)."""
    if kind == "index":
        return jax.vmap(take_rows)(x, plan.row_token, plan.token_rows)
    if kind == "einsum":
        return jnp.einsum("gsd,gsr->grd", x, _dispatch_mask(plan, x.dtype))
    raise ValueError(f"dispatch={kind!r} is not allowed; allowed: {DISPATCH_KINDS}")


def combine(rows: jax.Array, plan: Plan, kind: str = "index") -> jax.Array:
    """Expert outputs [G, R, D] -> tokens [G, S, D]: sum over choices of gate * output."""
    gates = plan.token_gates.astype(rows.dtype)
    if kind == "index":
        return jax.vmap(combine_rows)(
            rows, plan.token_rows, gates, plan.row_token, plan.row_gate.astype(rows.dtype)
        )
    if kind == "einsum":
        one_hot = jax.nn.one_hot(plan.token_rows, plan.num_rows, dtype=rows.dtype)  # [G,J,S,R]
        combine_weights = jnp.einsum("gjsr,gjs->gsr", one_hot, gates)
        return jnp.einsum("grd,gsr->gsd", rows, combine_weights)
    raise ValueError(f"dispatch={kind!r} is not allowed; allowed: {DISPATCH_KINDS}")


def rows_to_choices(rows: jax.Array, plan: Plan) -> jax.Array:
    """Slot rows [G, R, X] -> each (choice, token)'s row, ungated [G, J, S, X] (zeros where
    the choice was dropped or not made). For layers that work on each choice apart (MoA
    attends with each chosen expert's query) instead of summing them as `combine` does."""
    num_groups, num_choices, group_size = plan.token_rows.shape
    index = plan.token_rows.reshape(num_groups, -1)  # [G, J * S]
    # Each row is read by at most one choice: row_assign is the inverse map.
    out = jax.vmap(take_rows)(rows, index, plan.row_assign[:, None, :])
    return out.reshape(num_groups, num_choices, group_size, rows.shape[-1])


def choices_to_rows(values: jax.Array, plan: Plan) -> jax.Array:
    """Per-(choice, token) values [G, J, S, X] -> slot rows [G, R, X] (zeros in empty rows);
    the inverse of rows_to_choices."""
    num_groups = values.shape[0]
    flat = values.reshape(num_groups, -1, values.shape[-1])  # [G, J * S, X]
    inverse = plan.token_rows.reshape(num_groups, 1, -1)  # [G, 1, J * S]: one reader each
    return jax.vmap(take_rows)(flat, plan.row_assign, inverse)


def _dispatch_mask(plan: Plan, dtype) -> jax.Array:
    """[G, S, R] one-hot: 1 where token s fills row r."""
    one_hot = jax.nn.one_hot(plan.token_rows, plan.num_rows, dtype=dtype)  # [G, J, S, R]
    return jnp.sum(one_hot, axis=1)
