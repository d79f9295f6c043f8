"""Dropless expert MLPs over rows sorted by expert (a grouped matmul, Megablocks style).

Rows [R, D] come sorted by expert, each expert's run padded to whole blocks of B rows, so
expert e owns blocks [block_bounds[e], block_bounds[e + 1]). The forward and backward
passes loop over experts (E static, so each expert's weights are a static slice, never
copied per block) and, inside, over that expert's blocks (a dynamic trip count, so empty
padding blocks of the static row bound cost nothing). jax.lax.ragged_dot would express
the same thing, but on CPU it lowers to a dense [E, R, D] computation (E times the FLOPs).

Shapes: R rows, D d_model, H d_hidden, E experts, B rows per block.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def grouped_mlp(
    act: Callable[[jax.Array], jax.Array],
    block: int,
    rows: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    block_bounds: jax.Array,
) -> jax.Array:
  """rows [R, D] -> [R, D]: block b of expert e becomes act(rows_b @ w_in[e]) @ w_out[e].

  Rows of blocks outside every expert's range come back as zeros.
  """
  return _forward(act, block, rows, w_in, w_out, block_bounds)[0]


def _forward(act, block, rows, w_in, w_out, block_bounds):
  num_rows, d_model = rows.shape
  out = jnp.zeros((num_rows, d_model), rows.dtype)
  pre = jnp.zeros((num_rows, w_in.shape[-1]), rows.dtype)  # pre-activations, kept for bwd
  for e in range(w_in.shape[0]):
    w1, w2 = w_in[e], w_out[e]

    def body(b, carry, w1=w1, w2=w2):
      out, pre = carry
      x_b = jax.lax.dynamic_slice_in_dim(rows, b * block, block)  # [B, D]
      pre_b = x_b @ w1  # [B, H]
      out = jax.lax.dynamic_update_slice_in_dim(out, act(pre_b) @ w2, b * block, 0)
      pre = jax.lax.dynamic_update_slice_in_dim(pre, pre_b, b * block, 0)
      return out, pre

    out, pre = jax.lax.fori_loop(block_bounds[e], block_bounds[e + 1], body, (out, pre))
  return out, pre


def _grouped_mlp_fwd(act, block, rows, w_in, w_out, block_bounds):
  out, pre = _forward(act, block, rows, w_in, w_out, block_bounds)
  return out, (rows, w_in, w_out, block_bounds, pre)


def _grouped_mlp_bwd(act, block, residuals, d_out):
  rows, w_in, w_out, block_bounds, pre = residuals
  d_rows = jnp.zeros_like(rows)
  d_w_in, d_w_out = [], []
  for e in range(w_in.shape[0]):
    w1, w2 = w_in[e], w_out[e]

    def body(b, carry, w1=w1, w2=w2):
      d_rows, d_w1, d_w2 = carry
      start = b * block
      x_b = jax.lax.dynamic_slice_in_dim(rows, start, block)  # [B, D]
      pre_b = jax.lax.dynamic_slice_in_dim(pre, start, block)  # [B, H]
      d_out_b = jax.lax.dynamic_slice_in_dim(d_out, start, block)  # [B, D]
      hidden_b, act_vjp = jax.vjp(act, pre_b)
      (d_pre_b,) = act_vjp(d_out_b @ w2.T)  # [B, H]
      d_rows = jax.lax.dynamic_update_slice_in_dim(d_rows, d_pre_b @ w1.T, start, 0)
      return d_rows, d_w1 + x_b.T @ d_pre_b, d_w2 + hidden_b.T @ d_out_b

    d_rows, d_w1, d_w2 = jax.lax.fori_loop(
        block_bounds[e], block_bounds[e + 1], body,
        (d_rows, jnp.zeros_like(w1), jnp.zeros_like(w2)))
    d_w_in.append(d_w1)
    d_w_out.append(d_w2)
  return d_rows, jnp.stack(d_w_in), jnp.stack(d_w_out), None


grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd)
