"""Usage statistics and uncertainty task weighting (docs/methods.md, Mod-Squad).

References are independent of the layers' code: with `task` routing every token of task t
chooses the top-k of the row A[t], so the per-task choice counts are known in closed form;
the EMA and the uncertainty loss are checked against their formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from multitask_moe import models
from multitask_moe import moe as moe_lib
from multitask_moe.core import state, step
from multitask_moe.moe.usage import effective_experts, shares

E, K, T, B, L, D = 6, 2, 3, 6, 4, 8


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    task_ids = jnp.asarray([0, 2, 2, 0, 2, 1], jnp.int32)
    mask = jnp.asarray(rng.uniform(size=(B, L)) < 0.8).at[:, 0].set(True)
    return x, task_ids, mask


def closed_form_counts(task_logits, task_ids, mask):
    """[T, E]: each real token of task t chose the top-k columns of A[t]."""
    counts = np.zeros((T, E))
    for example, task in enumerate(np.asarray(task_ids)):
        top = np.argsort(-np.asarray(task_logits)[task], kind="stable")[:K]
        counts[task, top] += np.asarray(mask)[example].sum()
    return counts


@pytest.mark.parametrize("kind", ["moe", "moa"])
def test_usage_ema_counts_every_choice_even_dropped_ones(kind, batch):
    x, task_ids, mask = batch
    if kind == "moe":
        # Capacity 0.5 drops tokens; usage counts the choices, not the kept slots.
        layer = moe_lib.MoE(
            D, 8, E, K, "task", 0.5, num_tasks=T, usage_ema_decay=0.9, rngs=nnx.Rngs(1)
        )
    else:
        layer = moe_lib.MoA(D, E, K, 4, "task", T, usage_ema_decay=0.9, rngs=nnx.Rngs(1))
    assert layer.usage[...].shape == (T, E) and not layer.usage[...].any()
    _, aux = layer(x, task_ids, mask=mask)
    expected = closed_form_counts(layer.router.task_logits[...], task_ids, mask)
    np.testing.assert_allclose(np.asarray(aux["task_chosen_counts"]), expected)
    if kind == "moe":
        assert float(aux["dropped_fraction"]) > 0
        assert float(aux["task_expert_counts"].sum()) < expected.sum()
    layer.record_usage(aux)
    layer.record_usage(aux)
    # Two steps of u <- 0.9 u + 0.1 c from 0.
    np.testing.assert_allclose(np.asarray(layer.usage[...]), (0.9 * 0.1 + 0.1) * expected, 1e-6)


def test_effective_experts_and_shares_formulas():
    usage = jnp.asarray([[5.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [3, 1, 0, 0]])
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(
        np.asarray(effective_experts(usage)),
        [1.0, 4.0, 0.0, np.exp(-(p * np.log(p)).sum())],
        rtol=1e-6,
    )
    np.testing.assert_allclose(shares(usage)[3], [75, 25, 0, 0])
    assert not shares(usage)[2].any()


def test_bad_usage_decay_is_one_line():
    with pytest.raises(ValueError, match=r"usage_ema_decay=1.0 must be a number in \[0, 1\)"):
        moe_lib.MoE(D, 8, E, K, "task", num_tasks=T, usage_ema_decay=1.0, rngs=nnx.Rngs(0))


def make_step(task_weighting, weight_decay=0.0):
    settings = models.MoESettings(
        num_experts=E, top_k=K, d_hidden=8, routing="task", usage_ema_decay=0.8
    )
    model = models.MultitaskTransformer(
        task_num_classes=(3, 2, 4),
        task_modalities=("image",) * 3,
        token_shape=(L, 2),
        d_model=D,
        depth=2,
        num_heads=2,
        mlp_dim=16,
        moe=settings,
        moe_every=2,
        task_uncertainty=task_weighting == "uncertainty",
        rngs=nnx.Rngs(0),
    )
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    opt = ml_collections.ConfigDict(
        dict(
            learning_rate=0.05,
            warmup_steps=0,
            end_learning_rate_factor=1.0,
            b1=0.9,
            b2=0.99,
            weight_decay=weight_decay,
            grad_clip_norm=0.0,
        )
    )
    tx, schedule = state.make_optimizer(opt, 100)
    loss_settings = step.LossSettings(
        num_tasks=T,
        task_weights=(1.0,) * T,
        aux_weights={"load_balance": 0.0, "router_z": 0.0, "mutual_info": 0.0},
        sparse_layers=("block1/moe",),
        task_weighting=task_weighting,
    )
    train_state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": model_state,
        "opt_state": tx.init(params),
    }
    fn = jax.jit(step.make_train_step(graphdef, tx, schedule, loss_settings, skip_nonfinite=False))
    return graphdef, fn, train_state


def model_batch(batch):
    x, task_ids, mask = batch
    rng = np.random.default_rng(1)
    return {
        "inputs": jnp.asarray(rng.normal(size=(B, L, 2)), jnp.float32),
        "mask": mask,
        "label": jnp.asarray([0, 1, 2, 0, 1, 1], jnp.int32),
        "task_id": task_ids,
    }


def test_train_step_moves_the_usage_ema_and_logs_effective_experts(batch):
    graphdef, fn, train_state = make_step("fixed")
    data = model_batch(batch)
    new_state, metrics = fn(train_state, data)
    model = nnx.merge(graphdef, train_state["params"], train_state["model_state"])
    task_logits = model.blocks[1].mlp.moe.router.task_logits[...]
    expected = 0.2 * closed_form_counts(task_logits, data["task_id"], data["mask"])
    trained = nnx.merge(graphdef, new_state["params"], new_state["model_state"])
    np.testing.assert_allclose(np.asarray(trained.usage_tables()["block1/moe"]), expected, 1e-6)
    np.testing.assert_allclose(
        np.asarray(metrics["block1/moe/effective_experts"]),
        np.asarray(effective_experts(expected)),
        rtol=1e-6,
    )


def test_uncertainty_weighting_matches_its_formula_and_learns_undecayed_scales():
    rng = np.random.default_rng(0)
    cross_entropy = jnp.asarray(rng.uniform(0.2, 2.0, size=8), jnp.float32)
    task_ids = jnp.asarray([0, 0, 1, 0, 1, 1, 0, 0], jnp.int32)  # task 2 absent
    scale = jnp.asarray([0.5, 2.0, 3.0])
    settings = step.LossSettings(
        num_tasks=T,
        task_weights=(1.0, 2.0, 1.0),
        aux_weights={"load_balance": 0.0, "router_z": 0.0, "mutual_info": 0.0},
        sparse_layers=(),
        task_weighting="uncertainty",
    )
    loss, _, _ = step.task_loss(cross_entropy, task_ids, settings, scale)
    means = [float(cross_entropy[np.asarray(task_ids) == t].mean()) for t in (0, 1)]
    terms = [0.5 / s**2 * m + np.log(1 + s**2) for s, m in zip((0.5, 2.0), means, strict=True)]
    np.testing.assert_allclose(float(loss), (terms[0] + 2 * terms[1]) / 3, rtol=1e-6)
    # d/ds of 0.5 L / s^2 + log(1 + s^2) = -L / s^3 + 2 s / (1 + s^2); absent task: 0.
    grad = jax.grad(lambda s: step.task_loss(cross_entropy, task_ids, settings, s)[0])(scale)
    expected = [
        (-m / s**3 + 2 * s / (1 + s**2)) * w / 3
        for s, m, w in ((0.5, means[0], 1), (2.0, means[1], 2))
    ]
    np.testing.assert_allclose(np.asarray(grad), [*expected, 0.0], rtol=1e-5)

    graphdef, fn, train_state = make_step("uncertainty", weight_decay=0.5)
    assert not step.weight_decay_mask(train_state["params"])["task_loss_scale"].get_value()
    new_state, metrics = fn(train_state, model_batch((None, task_ids[:B], jnp.ones((B, L), bool))))
    np.testing.assert_array_equal(np.asarray(metrics["task_loss_scale"]), np.ones(T))
    moved = np.asarray(new_state["params"]["task_loss_scale"][...])
    assert (moved[:2] != 1.0).all() and moved[2] == 1.0  # task 2 absent: no gradient, no decay
