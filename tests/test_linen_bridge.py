"""The sparse layers inside a Flax Linen model through flax.nnx.bridge.to_linen: the same
values and gradients as the NNX layer holding the same parameters (docs/layers.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

import multitask_moe as mtm

LAYERS = {
    "moe": (mtm.MoE, dict(d_model=16, d_hidden=32, num_experts=4, top_k=2,
                          routing="task_tokens", capacity_factor=None, num_tasks=3)),
    "moa": (mtm.MoA, dict(d_model=16, num_experts=4, top_k=2, head_dim=8,
                          routing="per_task", num_tasks=3)),
}  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    ["moe", pytest.param("moa", marks=pytest.mark.slow)],  # the suite's time budget
)
def test_linen_wrapped_layer_equals_the_nnx_layer(kind):
    cls, kwargs = LAYERS[kind]
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    task_ids = jnp.array([0, 1, 2, 0])
    wrapped = bridge.to_linen(cls, **kwargs)
    variables = jax.jit(wrapped.init)(jax.random.key(1), x, task_ids)
    params = nn.unbox(variables["params"])

    layer = cls(**kwargs, rngs=nnx.Rngs(7))  # other initial values, replaced below
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, params)

    def linen_loss(params, x):
        y, aux = wrapped.apply({**variables, "params": params}, x, task_ids)
        return jnp.sum(y**2) + sum(v for k, v in aux.items() if k.endswith("_loss")), y

    def nnx_loss(state, x):
        y, aux = nnx.merge(graphdef, state, rest)(x, task_ids)
        return jnp.sum(y**2) + sum(v for k, v in aux.items() if k.endswith("_loss")), y

    # Compiled: op-by-op the layer's many small ops take most of a minute.
    (l1, y1), g1 = jax.jit(jax.value_and_grad(linen_loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x
    )
    (l2, y2), g2 = jax.jit(jax.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True))(state, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(g1[1], g2[1], rtol=1e-5, atol=1e-6)  # d loss / d x
    linen_grads = nn.unbox(g1[0])
    nnx_grads = nnx.to_pure_dict(g2[0])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        linen_grads,
        nnx_grads,
    )
