"""Dropless expert MLPs over rows sorted by expert (a grouped matmul, Megablocks style).

Rows [R, D] come sorted by expert: expert e owns rows [row_bounds[e], row_bounds[e + 1]),
each run either empty or at least one tile long. The forward and backward passes loop
over experts (E static, so each expert's weights are a static slice, never copied per
tile) and, inside, over that expert's tiles of B rows (a dynamic trip count, so the empty
slack of a static row bound costs nothing). A run that is not a whole number of tiles
ends with a tile shifted back to end on the run's last row; its rows already covered are
recomputed but counted once in the weight gradients. Tiles keep the [B, H] hidden
activations in cache, which on CPU beats one large batched matmul.
jax.lax.ragged_dot would express the same thing, but on CPU it lowers to a dense
[E, R, D] computation (E times the FLOPs).

Used for both layouts: dropless (runs padded to whole tiles) and capacity (E runs of C).

Shapes: R rows, D d_model, H d_hidden, E experts, B rows per tile.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def grouped_mlp(
    act: Callable[[jax.Array], jax.Array],
    tile: int,
    rows: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    row_bounds: jax.Array,
) -> jax.Array:
    """rows [R, D] -> [R, D]: row r of expert e becomes act(rows[r] @ w_in[e]) @ w_out[e].

    row_bounds [E + 1] int32, non-decreasing; rows outside [row_bounds[0], row_bounds[E])
    come back as zeros. Every non-empty run must hold at least `tile` rows.
    """
    return _forward(act, tile, rows, w_in, w_out, row_bounds)[0]


def _tiles(row_bounds, e, tile):
    """(start row of the run, number of tiles, function: tile index -> first row)."""
    start, end = row_bounds[e], row_bounds[e + 1]
    num_tiles = (end - start + tile - 1) // tile

    def first_row(i):
        return jnp.minimum(start + i * tile, end - tile)

    return start, num_tiles, first_row


def _zeros(shape, dtype, *like: jax.Array) -> jax.Array:
    """Zeros that vary over every mesh axis any of `like` varies over.

    Inside shard_map, a loop carry must keep one type through the loop: a plain constant is
    replicated while the loop body's results vary per device, and shard_map rejects the
    mismatch. Selecting 0 against the inputs gives the zeros the inputs' variation (and
    stays 0 even if an input holds NaN).
    """
    anchor = jnp.zeros((), dtype)
    for array in like:
        anchor = jnp.where(False, array.reshape(-1)[0].astype(dtype), anchor)
    return jnp.broadcast_to(anchor, shape)


def _varying_axes(x: jax.Array) -> frozenset:
    return jax.typeof(x).mat.varying


def _sum_to_variation_of(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside shard_map, a weight replicated over the batch axes gets per-device partial
    gradients; their sum over those axes is its gradient (what autodiff's transpose of the
    implicit broadcast would insert)."""
    extra = tuple(sorted(_varying_axes(grad) - _varying_axes(primal)))
    return jax.lax.psum(grad, extra) if extra else grad


def _forward(act, tile, rows, w_in, w_out, row_bounds):
    # The bounds are inputs too: computed on each device (ring, ragged), they vary per device.
    like = (rows, w_in, w_out, row_bounds)
    out = _zeros(rows.shape, rows.dtype, *like)
    pre = _zeros((rows.shape[0], w_in.shape[-1]), rows.dtype, *like)  # kept for bwd
    for e in range(w_in.shape[0]):
        w1, w2 = w_in[e], w_out[e]
        _, num_tiles, first_row = _tiles(row_bounds, e, tile)

        def body(i, carry, w1=w1, w2=w2, first_row=first_row):
            out, pre = carry
            row = first_row(i)
            pre_t = jax.lax.dynamic_slice_in_dim(rows, row, tile) @ w1  # [B, H]
            out = jax.lax.dynamic_update_slice_in_dim(out, act(pre_t) @ w2, row, 0)
            pre = jax.lax.dynamic_update_slice_in_dim(pre, pre_t, row, 0)
            return out, pre

        out, pre = jax.lax.fori_loop(0, num_tiles, body, (out, pre))
    return out, pre


def _grouped_mlp_fwd(act, tile, rows, w_in, w_out, row_bounds):
    out, pre = _forward(act, tile, rows, w_in, w_out, row_bounds)
    return out, (rows, w_in, w_out, row_bounds, pre)


def _grouped_mlp_bwd(act, tile, residuals, d_out):
    rows, w_in, w_out, row_bounds, pre = residuals
    d_rows = _zeros(rows.shape, rows.dtype, rows, w_in, w_out, d_out, row_bounds)
    d_w_in, d_w_out = [], []
    for e in range(w_in.shape[0]):
        w1, w2 = w_in[e], w_out[e]
        start, num_tiles, first_row = _tiles(row_bounds, e, tile)

        def body(i, carry, w1=w1, w2=w2, start=start, first_row=first_row):
            d_rows, d_w1, d_w2 = carry
            row = first_row(i)
            x_t = jax.lax.dynamic_slice_in_dim(rows, row, tile)  # [B, D]
            pre_t = jax.lax.dynamic_slice_in_dim(pre, row, tile)  # [B, H]
            d_out_t = jax.lax.dynamic_slice_in_dim(d_out, row, tile)  # [B, D]
            hidden_t, act_vjp = jax.vjp(act, pre_t)
            (d_pre_t,) = act_vjp(d_out_t @ w2.T)  # [B, H]
            d_rows = jax.lax.dynamic_update_slice_in_dim(d_rows, d_pre_t @ w1.T, row, 0)
            # A shifted last tile repeats rows of the previous one: count them once.
            fresh = (row + jnp.arange(tile) >= start + i * tile)[:, None]  # [B, 1]
            d_w1 = d_w1 + x_t.T @ jnp.where(fresh, d_pre_t, 0)
            d_w2 = d_w2 + hidden_t.T @ jnp.where(fresh, d_out_t, 0)
            return d_rows, d_w1, d_w2

        d_rows, d_w1, d_w2 = jax.lax.fori_loop(
            0,
            num_tiles,
            body,
            (
                d_rows,
                _zeros(w1.shape, w1.dtype, rows, w_in, w_out, d_out, row_bounds),
                _zeros(w2.shape, w2.dtype, rows, w_in, w_out, d_out, row_bounds),
            ),
        )
        d_w_in.append(d_w1)
        d_w_out.append(d_w2)
    return (
        _sum_to_variation_of(d_rows, rows),
        _sum_to_variation_of(jnp.stack(d_w_in), w_in),
        _sum_to_variation_of(jnp.stack(d_w_out), w_out),
        None,
    )


grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd)
