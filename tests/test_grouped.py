"""The tiled grouped MLP (hand-written VJP) against plain per-row autodiff."""

import jax
import jax.numpy as jnp
import numpy as np

from multitask_moe.moe.grouped import grouped_mlp


def test_grouped_mlp_matches_per_row_reference_with_ragged_runs():
  # Runs of 5, 0, 7 and 3 rows with tiles of 3: shifted last tiles (5 = 3 + 2, 7 = 3+3+1),
  # an empty expert, a run of exactly one tile, and 2 rows of slack after the last run.
  bounds = jnp.array([0, 5, 5, 12, 15], jnp.int32)
  keys = jax.random.split(jax.random.key(0), 4)
  rows = jax.random.normal(keys[0], (17, 6))
  w_in = jax.random.normal(keys[1], (4, 6, 5))
  w_out = jax.random.normal(keys[2], (4, 5, 6))
  cotangent = jax.random.normal(keys[3], (17, 6))
  expert_of_row = np.searchsorted(np.asarray(bounds), np.arange(17), side="right") - 1

  def reference(rows, w_in, w_out):
    out = []
    for r in range(17):
      e = expert_of_row[r]
      if e >= 4:  # slack past the last run
        out.append(jnp.zeros(6))
      else:
        out.append(jax.nn.gelu(rows[r] @ w_in[e]) @ w_out[e])
    return jnp.stack(out)

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args) * cotangent)

  got = grouped_mlp(jax.nn.gelu, 3, rows, w_in, w_out, bounds)
  np.testing.assert_allclose(got, reference(rows, w_in, w_out), atol=1e-5, rtol=1e-5)
  grads = jax.grad(loss(lambda *a: grouped_mlp(jax.nn.gelu, 3, *a, bounds)),
                   argnums=(0, 1, 2))(rows, w_in, w_out)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(rows, w_in, w_out)
  for g, w in zip(grads, want, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)
