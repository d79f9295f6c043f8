"""Token masks: padding is not routed, takes no capacity and enters no statistic.

References are independent of the mask code: masking whole sequences must equal dropping
them from the batch, and a masked plan must keep for the real tokens exactly what the plan
of the real tokens alone keeps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_moe_layer import BATCH, LENGTH, ROUTINGS, D, E, K, make

from multitask_moe.moe import plan as plan_lib

# Sequences 1 and 3 are all padding.
SEQUENCE_MASK = np.array([True, False, True, False])[:, None].repeat(LENGTH, axis=1)
KEPT_SEQUENCES = np.array([0, 2])


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, D), jnp.float32)
    task_ids = jnp.array([0, 2, 1, 2], jnp.int32)
    return x, task_ids


@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["capacity", "dropless"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_masked_sequences_equal_dropping_them(routing, capacity_factor, inputs):
    x, task_ids = inputs
    layer = make(routing, capacity_factor=capacity_factor, num_shared_experts=1)
    y, aux = layer(x, task_ids, mask=jnp.asarray(SEQUENCE_MASK))
    want_y, want_aux = layer(x[KEPT_SEQUENCES], task_ids[KEPT_SEQUENCES])
    np.testing.assert_allclose(y[KEPT_SEQUENCES], want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(y[~SEQUENCE_MASK[:, 0]], 0.0)  # shared experts included
    assert aux.keys() == want_aux.keys()
    for name in aux:
        np.testing.assert_allclose(aux[name], want_aux[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_padding_takes_no_capacity():
    # One group of 8 tokens, the 4 padding tokens first, so in token order they would fill
    # every slot before any real token (C = 2 per expert, all tokens on expert 0 first).
    probs = jax.nn.softmax(jnp.tile(jnp.array([4.0, 2.0, 0.0, -1.0]), (1, 8, 1)), axis=-1)
    probs = probs * jnp.linspace(1.0, 0.9, 8)[None, :, None]  # distinct, same ranking
    valid = jnp.arange(8)[None, :] >= 4  # [1, 8]
    masked = plan_lib.token_choice(probs, K, 2, valid=valid)
    unmasked = plan_lib.token_choice(probs, K, 2)
    alone = plan_lib.token_choice(probs[:, 4:], K, 2)  # the real tokens by themselves
    assert float(unmasked.kept[0, 4:].sum()) == 0  # without a mask padding took every slot
    np.testing.assert_array_equal(masked.kept[0, 4:], alone.kept[0])
    np.testing.assert_array_equal(masked.token_gates[0, :, 4:], alone.token_gates[0])
    np.testing.assert_array_equal(masked.kept[0, :4], 0)
    np.testing.assert_array_equal(masked.chosen[0, :4], 0)
    assert int((masked.row_assign < K * 8).sum()) == int(alone.kept.sum())  # filled rows
    # Batch priority puts padding last too.
    bpr = plan_lib.token_choice(probs, K, 2, valid=valid, batch_priority=True)
    np.testing.assert_array_equal(bpr.kept[0, :4], 0)
    assert float(bpr.kept.sum()) == float(alone.kept.sum())


def test_expert_choice_never_picks_padding():
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 6, E)) * 3, axis=-1)
    valid = jnp.array([[True] * 6, [True, False, True, False, False, False]])
    plan = plan_lib.expert_choice(probs, 4, valid)  # C = 4 > the 2 real tokens of group 1
    np.testing.assert_array_equal(plan.kept[1][~np.asarray(valid[1])], 0)
    np.testing.assert_array_equal(plan.kept[1][np.asarray(valid[1])], 1)  # both, every expert
    np.testing.assert_array_equal(plan.kept[0], plan_lib.expert_choice(probs, 4).kept[0])
    assert int((plan.row_assign[1] < E * 6).sum()) == 2 * E  # the other slots stay empty


def test_dropless_mask_keeps_real_tokens_exact(inputs):
    x, task_ids = inputs
    mask = jax.random.bernoulli(jax.random.key(5), 0.6, (BATCH, LENGTH))
    layer = make("task_tokens", capacity_factor=None)
    y, aux = layer(x, task_ids, mask=mask)
    plain, _ = layer(x, task_ids)  # dropless routes each token on its own
    np.testing.assert_allclose(y[mask], plain[mask], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(y[~mask], 0.0)
    np.testing.assert_allclose(aux["expert_counts"].sum(), K * mask.sum())
    np.testing.assert_allclose(aux["task_expert_counts"].sum(), K * mask.sum())


def test_all_padding_gives_zero_output_and_finite_losses(inputs):
    x, task_ids = inputs
    layer = make("per_task", capacity_factor=1.0)

    def loss(x):
        y, aux = layer(x, task_ids, mask=jnp.zeros((BATCH, LENGTH), bool))
        return (
            jnp.sum(y) + aux["load_balance_loss"] + aux["router_z_loss"] + aux["mutual_info_loss"]
        ), (y, aux)

    (value, (y, aux)), grad = jax.value_and_grad(loss, has_aux=True)(x)
    np.testing.assert_array_equal(y, 0.0)
    assert float(value) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((aux, grad)))


def test_bad_mask_raises(inputs):
    x, task_ids = inputs
    layer = make("tokens")
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape"):
        layer(x, task_ids, mask=jnp.ones((BATCH, LENGTH + 1), bool))
    with pytest.raises(ValueError, match=r"mask must be a bool array"):
        layer(x, task_ids, mask=jnp.ones((BATCH, LENGTH), jnp.int32))


@pytest.mark.parametrize("routing", ["tokens", "experts"])
def test_dispatch_kinds_agree_under_a_mask(routing, inputs):
    x, task_ids = inputs
    mask = jax.random.bernoulli(jax.random.key(6), 0.5, (BATCH, LENGTH))
    index = make(routing, capacity_factor=1.0)
    einsum = make(routing, capacity_factor=1.0, dispatch="einsum")
    y, aux = index(x, task_ids, mask=mask)
    want_y, want_aux = einsum(x, task_ids, mask=mask)
    np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(aux["expert_counts"], want_aux["expert_counts"])
    np.testing.assert_array_equal(y[~mask], 0.0)
