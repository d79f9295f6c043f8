"""Aux losses against hand-computed values (docs/methods.md formulas written out in numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import multitask_moe as mtm
from multitask_moe.moe import losses


def stats_for(logits, kept, chosen, task_ids=None, num_tasks=None):
    logits = jnp.asarray(logits, jnp.float32)
    probs = jnp.exp(logits) / jnp.sum(jnp.exp(logits), axis=-1, keepdims=True)
    return losses.router_stats(
        logits,
        probs,
        jnp.asarray(kept, jnp.float32),
        jnp.asarray(chosen, jnp.float32),
        None if task_ids is None else jnp.asarray(task_ids),
        num_tasks,
    )


def test_load_balance_z_loss_entropy_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    chosen = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    kept = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])  # token 3 dropped
    aux = losses.aux_from_stats(stats_for(logits, kept, chosen), choice="tokens")
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    f = np.array([2, 1, 1]) / 4
    np.testing.assert_allclose(aux["load_balance_loss"], 3 * np.sum(f * p.mean(0)), rtol=1e-6)
    log_z = np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(aux["router_z_loss"], np.mean(log_z**2), rtol=1e-6)
    np.testing.assert_allclose(aux["router_entropy"], np.mean(-(p * np.log(p)).sum(1)), rtol=1e-6)
    np.testing.assert_allclose(aux["dropped_fraction"], 0.25)
    np.testing.assert_array_equal(aux["expert_counts"], [1, 1, 1])
    np.testing.assert_allclose(aux["mutual_info_loss"], 0.0)  # no tasks known


def mi_by_hand(s):
    joint = s / s.sum()
    pt, pe = joint.sum(1), joint.sum(0)
    total = 0.0
    for t in range(s.shape[0]):
        for e in range(s.shape[1]):
            if pt[t] * pe[e] > 0:
                total -= joint[t, e] * np.log(joint[t, e] / (pt[t] * pe[e]) + 1e-4)
    return total


def test_mutual_information_loss_values_and_minimum():
    rng = np.random.default_rng(0)
    constructed = np.array([[3.0, 1.0, 0.5, 0.0], [0.2, 0.2, 2.0, 1.0], [1.0, 0.0, 0.0, 4.0]])
    np.testing.assert_allclose(
        losses.mutual_info_loss(jnp.asarray(constructed)), mi_by_hand(constructed), rtol=1e-5
    )
    # Two tasks on disjoint expert pairs: P(t, e) = 1/4 on the used cells, ratio 2 there.
    disjoint = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    best = float(losses.mutual_info_loss(jnp.asarray(disjoint)))
    np.testing.assert_allclose(best, -np.log(2 + 1e-4), rtol=1e-6)
    uniform = float(losses.mutual_info_loss(jnp.ones((2, 4))))
    np.testing.assert_allclose(uniform, -np.log(1 + 1e-4), atol=1e-7)
    for _ in range(20):  # nothing beats disjoint use (I(T; E) <= H(T) = log 2)
        assert float(losses.mutual_info_loss(jnp.asarray(rng.random((2, 4))))) >= best - 1e-6


def test_layer_reports_task_expert_statistics():
    layer = mtm.MoE(
        8, 16, 4, 1, routing="task", num_tasks=2, capacity_factor=None, rngs=nnx.Rngs(0)
    )
    # Make task 0 prefer expert 3 and task 1 expert 0: every token of a task picks it.
    layer.router.task_logits[...] = jnp.array([[0.0, 0.0, 0.0, 5.0], [5.0, 0.0, 0.0, 0.0]])
    x = jnp.ones((3, 2, 8))
    _, aux = layer(x, jnp.array([0, 1, 1]))
    np.testing.assert_array_equal(aux["task_expert_counts"], [[0, 0, 0, 2], [4, 0, 0, 0]])
    p = np.exp([0, 0, 0, 5.0]) / np.exp([0, 0, 0, 5.0]).sum()
    s = np.array([2 * p, 4 * p[::-1]])
    np.testing.assert_allclose(aux["mutual_info_loss"], mi_by_hand(s), rtol=1e-5)


@pytest.mark.parametrize("choice", ["tokens", "experts"])
def test_dropped_fraction_definitions(choice):
    kept = np.array([[1, 0], [0, 0], [0, 1]])
    chosen = np.array([[1, 1], [1, 0], [0, 1]])
    aux = losses.aux_from_stats(stats_for(np.zeros((3, 2)), kept, chosen), choice=choice)
    # tokens: 2 of 4 chosen assignments kept; experts: 1 of 3 tokens got no expert.
    np.testing.assert_allclose(aux["dropped_fraction"], 0.5 if choice == "tokens" else 1 / 3)


def test_mutual_information_gradient_is_finite_with_an_absent_task():
    # Task 2 has no tokens in the batch: its row of S is 0.
    grad = jax.grad(losses.mutual_info_loss)(jnp.array([[1.0, 2.0], [3.0, 0.5], [0.0, 0.0]]))
    assert bool(jnp.all(jnp.isfinite(grad)))
