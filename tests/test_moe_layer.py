"""The MoE layer against plain-loop references, capacity semantics, gradients, errors."""

import jax
import jax.numpy as jnp
import moe_reference as ref
import numpy as np
import pytest
from flax import nnx

import multitask_moe as mtm
from multitask_moe.moe import plan as plan_lib

ROUTINGS = ["tokens", "experts", "task", "task_tokens", "per_task"]
D, H, E, K, T = 8, 16, 4, 2, 3
BATCH, LENGTH = 4, 6


def make(routing="tokens", rngs_seed=0, **kwargs):
    kwargs.setdefault("num_tasks", T)
    # A wider router init than the default spreads probabilities, so top-k has no near-ties
    # that float32 and the float64 reference could break differently.
    layer = mtm.MoE(D, H, E, K, routing=routing, rngs=nnx.Rngs(rngs_seed), **kwargs)
    if hasattr(layer.router, "kernel"):
        layer.router.kernel[...] = layer.router.kernel[...] * 50
    if hasattr(layer.router, "task_logits"):
        layer.router.task_logits[...] = layer.router.task_logits[...] * 50
    return layer


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D), jnp.float32)
    task_ids = jnp.array([0, 2, 1, 2], jnp.int32)
    return x, task_ids


@pytest.mark.parametrize("routing", ROUTINGS)
def test_dropless_equals_loop_reference(routing, inputs):
    x, task_ids = inputs
    layer = make(routing, capacity_factor=None)
    y, aux = layer(x, task_ids)
    expected, _ = ref.moe_loop(layer, x, task_ids)
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("routing", ROUTINGS)
def test_capacity_matches_reference_and_dispatches_agree(routing, inputs):
    x, task_ids = inputs
    group = 12  # two groups of 12 tokens: capacity is per group
    outs = {}
    for kind in ("index", "einsum"):
        layer = make(routing, capacity_factor=1.0, group_size=group, dispatch=kind)
        outs[kind] = layer(x, task_ids)
    cap = plan_lib.capacity(1.0, group, K, E)
    expected, kept = ref.moe_loop(layer, x, task_ids, capacity=cap, group_size=group)
    for kind, (y, aux) in outs.items():
        np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5, err_msg=kind)
        np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), kept.sum(0))
    np.testing.assert_array_equal(
        np.asarray(outs["index"][1]["task_expert_counts"]),
        np.asarray(outs["einsum"][1]["task_expert_counts"]),
    )
    assert float(outs["index"][1]["dropped_fraction"]) == float(
        outs["einsum"][1]["dropped_fraction"]
    )


def test_default_routing_group_is_one_sequence(inputs):
    x, task_ids = inputs
    layer = make("task_tokens", capacity_factor=0.75)
    y, aux = layer(x, task_ids)
    cap = plan_lib.capacity(0.75, LENGTH, K, E)
    expected, kept = ref.moe_loop(layer, x, task_ids, capacity=cap, group_size=LENGTH)
    assert kept.sum() < BATCH * LENGTH * K, "input does not overflow"
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def test_known_overflow_drops_exactly():
    # A zero router gives every token the same probabilities; ties go to the lowest index,
    # so all 8 tokens choose experts 0 (first) and 1 (second). C = ceil(1.0 * 8 * 2 / 4) = 4:
    # tokens 0..3 fill both experts, tokens 4..7 lose both choices and output exactly 0.
    layer = mtm.MoE(
        D, H, E, K, routing="tokens", capacity_factor=1.0, router_init="zeros", rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(2), (1, 8, D))
    y, aux = layer(x)
    assert float(aux["dropped_fraction"]) == 0.5
    np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), [4, 4, 0, 0])
    np.testing.assert_array_equal(np.asarray(y[0, 4:]), 0.0)
    p = ref.params(layer)
    x64 = np.asarray(x[0], np.float64)
    for n in range(4):
        want = 0.25 * ref.expert_mlp(p, 0, x64[n]) + 0.25 * ref.expert_mlp(p, 1, x64[n])
        np.testing.assert_allclose(np.asarray(y[0, n]), want, atol=1e-6)


def test_batch_priority_keeps_most_confident_tokens(inputs):
    x, _ = inputs
    layer = make("tokens", capacity_factor=0.5, batch_priority=True, group_size=BATCH * LENGTH)
    y, aux = layer(x)
    cap = plan_lib.capacity(0.5, BATCH * LENGTH, K, E)
    expected, kept = ref.moe_loop(layer, x, capacity=cap, batch_priority=True)
    plain, plain_kept = ref.moe_loop(layer, x, capacity=cap)
    assert not np.array_equal(kept, plain_kept), "input does not exercise priority"
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)


def test_expert_choice_fills_every_expert(inputs):
    x, _ = inputs
    layer = make("experts", capacity_factor=1.0, group_size=12)
    _, aux = layer(x)
    cap = plan_lib.capacity(1.0, 12, K, E)
    np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), np.full(E, 2 * cap))


def test_eval_capacity_factor_applies_when_deterministic(inputs):
    x, _ = inputs
    layer = make("tokens", capacity_factor=0.5, eval_capacity_factor=None)
    _, train_aux = layer(x)
    _, eval_aux = layer(x, deterministic=True)
    assert float(train_aux["dropped_fraction"]) > 0
    assert float(eval_aux["dropped_fraction"]) == 0.0
    layer.eval()  # nnx flips `deterministic` attributes
    _, aux = layer(x)
    assert float(aux["dropped_fraction"]) == 0.0


def test_renormalized_gates_and_shared_experts(inputs):
    x, _ = inputs
    layer = make("tokens", capacity_factor=None, renormalize_gates=True, num_shared_experts=2)
    y, _ = layer(x)
    routed, _ = ref.moe_loop(layer, x, renormalize=True)
    shared = {
        "w_in": np.asarray(layer.shared_experts.w_in[...], np.float64),
        "w_out": np.asarray(layer.shared_experts.w_out[...], np.float64),
    }
    x64 = np.asarray(x, np.float64)
    dense = sum(ref.expert_mlp(shared, e, x64) for e in range(2))
    np.testing.assert_allclose(np.asarray(y), routed + dense, atol=1e-5)


def test_router_noise_only_in_training(inputs):
    x, _ = inputs
    layer = make("tokens", router_noise=1.0, capacity_factor=None)
    a, _ = layer(x)
    b, _ = layer(x)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    # At evaluation the output is the noiseless loop reference's (noise drawn there, or a
    # stale draw reused, would move it).
    c, _ = layer(x, deterministic=True)
    expected, _ = ref.moe_loop(layer, x)
    np.testing.assert_allclose(np.asarray(c), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["task", "task_tokens", "per_task"])
def test_gradients_reach_router_and_used_experts(routing, inputs):
    x, task_ids = inputs
    layer = make(routing, capacity_factor=1.0)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def loss_and_grads(params):
        def loss(params):
            y, aux = nnx.merge(graphdef, params, rest)(x, task_ids)
            return jnp.mean(jnp.square(y)) + 0.01 * aux["mutual_info_loss"], aux

        return jax.grad(loss, has_aux=True)(params)

    grads, aux = loss_and_grads(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    router = grads["router"]
    for name in ("kernel", "task_logits"):
        if name in router:
            assert float(jnp.abs(router[name][...]).sum()) > 0, name
    used = np.asarray(aux["expert_counts"]) > 0
    w_in_norm = np.asarray(jnp.abs(grads["experts"]["w_in"][...]).sum(axis=(1, 2)))
    np.testing.assert_array_equal(w_in_norm > 0, used)
    # The same layer built again from its seed, traced and compiled anew: the same
    # gradients, bit for bit.
    graphdef2, params2, rest2 = nnx.split(make(routing, capacity_factor=1.0), nnx.Param, ...)

    @jax.jit
    def grads_again(params):
        def loss(params):
            y, aux = nnx.merge(graphdef2, params, rest2)(x, task_ids)
            return jnp.mean(jnp.square(y)) + 0.01 * aux["mutual_info_loss"]

        return jax.grad(loss)(params)

    for g1, g2 in zip(leaves, jax.tree.leaves(grads_again(params2)), strict=True):
        np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))


def test_bfloat16_activations_and_params(inputs):
    x, task_ids = inputs
    ref_layer = make("task_tokens", capacity_factor=None)
    layer = make("task_tokens", capacity_factor=None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert layer.experts.w_in[...].dtype == jnp.bfloat16
    for name in ("w_in", "w_out"):  # the same weights, in float32, for the reference
        getattr(ref_layer.experts, name)[...] = getattr(layer.experts, name)[...].astype(
            jnp.float32
        )
    assert layer.router.kernel[...].dtype == jnp.float32  # router math stays float32
    y, aux = layer(x.astype(jnp.bfloat16), task_ids)
    assert y.dtype == jnp.bfloat16
    assert aux["load_balance_loss"].dtype == jnp.float32
    # Against the float32 layer on the same (bfloat16-rounded) inputs and weights: what is
    # left is bfloat16's own rounding, about 0.5% of the output's scale here (8 bits of
    # mantissa); the bound allows 2%, far below a wrong expert or gate (tens of percent).
    want, _ = ref_layer(x.astype(jnp.bfloat16).astype(jnp.float32), task_ids)
    want = np.asarray(want)
    error = np.abs(np.asarray(y, np.float32) - want)
    assert error.max() <= 0.02 * np.abs(want).max(), (error.max(), np.abs(want).max())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 5}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"routing": "task", "num_tasks": None}, "num_tasks"),
        ({"routing": "nope"}, "routing"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"dispatch": "ragged"}, "dispatch"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"d_model": D, "d_hidden": H, "num_experts": E, "top_k": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        mtm.MoE(**args, rngs=nnx.Rngs(0))


def test_bad_call_arguments(inputs):
    x, task_ids = inputs
    layer = make("task")
    with pytest.raises(ValueError, match="task_ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"task_ids contain \[3\]"):
        layer(x, jnp.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(jnp.zeros((2, 3, 5)), task_ids[:2])
    with pytest.raises(ValueError, match="group_size"):
        make("tokens", group_size=5)(x)


@pytest.mark.parametrize("capacity_factor", [1.0, None])
def test_dispatch_kinds_have_equal_gradients(capacity_factor, inputs):
    # The index path has hand-written backward passes (gathers through inverse maps and the
    # grouped dropless MLP); the einsum path is plain autodiff of dense one-hot algebra.
    x, task_ids = inputs
    grads = {}
    for kind in ("index", "einsum"):
        layer = make(
            "task_tokens", capacity_factor=capacity_factor, dispatch=kind, dropless_block_size=4
        )
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

        def loss(params, x, graphdef=graphdef, rest=rest):
            y, aux = nnx.merge(graphdef, params, rest)(x, task_ids)
            return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"]

        grads[kind] = jax.grad(loss, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grads["index"]), jax.tree.leaves(grads["einsum"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["tokens", "task_tokens"])
def test_switched_off_experts_are_never_chosen(routing, inputs):
    """expert_mask: a layer of E experts with expert 1 switched off computes what a layer
    holding only the other E - 1 experts computes (the softmax over the active columns),
    its router gets no gradient for the off column, and the statistics stay finite."""
    x, task_ids = inputs
    masked = make(routing, capacity_factor=None, expert_mask=True)
    masked.active_experts[...] = jnp.array([True, False, True, True])
    kept = jnp.array([0, 2, 3])
    small = mtm.MoE(D, H, E - 1, K, routing=routing, capacity_factor=None, num_tasks=T,
                    rngs=nnx.Rngs(0))  # fmt: skip
    small.experts.w_in[...] = masked.experts.w_in[...][kept]
    small.experts.w_out[...] = masked.experts.w_out[...][kept]
    if hasattr(masked.router, "kernel"):
        small.router.kernel[...] = masked.router.kernel[...][:, kept]
    if hasattr(masked.router, "task_logits"):
        small.router.task_logits[...] = masked.router.task_logits[...][:, kept]
    y, aux = masked(x, task_ids)
    expected, _ = small(x, task_ids)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), atol=1e-6, rtol=1e-6)
    assert all(np.isfinite(np.asarray(value)).all() for value in aux.values())

    graphdef, params, rest = nnx.split(masked, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x, task_ids)[0] ** 2))(params)
    router_grads = grads["router"]
    column = "kernel" if "kernel" in router_grads else "task_logits"
    assert np.all(np.asarray(router_grads[column][...])[..., 1] == 0)
    assert np.any(np.asarray(router_grads[column][...])[..., 0] != 0)
