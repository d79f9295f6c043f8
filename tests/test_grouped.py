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
    grads = jax.grad(loss(lambda *a: grouped_mlp(jax.nn.gelu, 3, *a, bounds)), argnums=(0, 1, 2))(
        rows, w_in, w_out
    )
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(rows, w_in, w_out)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


def test_experts_tiled_capacity_path_equals_batched_einsum():
    # Small slot buffers take the batched einsum; forcing the tiled path (budget 0) must give
    # the same values and gradients. G * C = 3 * 5 = 15 rows per expert with tile 4 -> 4
    # balanced tiles of 4 rows (the last shifted back by one row).
    from flax import nnx

    from multitask_moe.moe.experts import Experts

    experts = Experts(3, 6, 8, rngs=nnx.Rngs(0))
    tiled_experts = Experts(3, 6, 8, max_batched_hidden_bytes=0, rngs=nnx.Rngs(0))
    slots = jax.random.normal(jax.random.key(1), (3, 3, 5, 6))  # [G, E, C, D]
    cotangent = jax.random.normal(jax.random.key(2), slots.shape)
    graphdef, params = nnx.split(experts)
    tiled_graphdef = nnx.graphdef(tiled_experts)

    def loss(params, slots, graphdef=graphdef, **kwargs):
        out = nnx.merge(graphdef, params)(slots, **kwargs)
        return jnp.sum(out * cotangent), out

    (_, tiled), tiled_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, slots, tiled_graphdef, tile=4
    )
    (_, batched), batched_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, slots
    )
    np.testing.assert_allclose(tiled, experts.batched(slots), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tiled, batched, atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(tiled_grads), jax.tree.leaves(batched_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
