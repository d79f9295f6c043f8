"""Mixture of attention heads against a per-token, per-head loop reference."""

import jax
import jax.numpy as jnp
import moe_reference as ref
import numpy as np
import pytest
from flax import nnx

import multitask_moe as mtm


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    return x, jnp.array([1, 0]), mask


@pytest.mark.parametrize(
    "routing, causal", [("tokens", False), ("per_task", True), ("task_tokens", False)]
)
def test_moa_equals_loop_reference(routing, causal, inputs):
    x, task_ids, mask = inputs
    layer = mtm.MoA(8, 5, 2, 4, routing=routing, num_tasks=2, causal=causal, rngs=nnx.Rngs(3))
    layer.router.kernel[...] = layer.router.kernel[...] * 50
    y, aux = layer(x, task_ids, mask=mask)
    want = ref.moa_loop(layer, x, np.asarray(task_ids), np.asarray(mask), causal=causal)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)
    assert aux["task_expert_counts"].shape == (2, 5)
    # top-k choices of the valid tokens only: padding is not routed
    np.testing.assert_allclose(float(aux["task_expert_counts"].sum()), int(mask.sum()) * 2)


def test_moa_gradients_and_errors(inputs):
    x, task_ids, mask = inputs
    layer = mtm.MoA(8, 5, 2, 4, routing="task", num_tasks=2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        y, aux = nnx.merge(graphdef, params, rest)(x, task_ids, mask=mask)
        return jnp.mean(y**2) + aux["mutual_info_loss"]

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["router"]["task_logits"][...]).sum()) > 0
    with pytest.raises(ValueError, match="routing='experts'"):
        mtm.MoA(8, 5, 2, 4, routing="experts", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask"):
        layer(x, task_ids, mask=mask[:, :3])
