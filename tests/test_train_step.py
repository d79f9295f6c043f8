"""Train-step pieces against independent references: the multitask loss, aux weighting,
non-finite handling, optimizer schedule, metrics accumulation and writers."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from multitask_moe import models
from multitask_moe.core import config_lib, state, step
from multitask_moe.core.evaluate import results_table
from multitask_moe.train import metrics


def settings(num_tasks=3, task_weights=None, aux=None, layers=()):
    return step.LossSettings(
        num_tasks=num_tasks,
        task_weights=tuple(task_weights or [1.0] * num_tasks),
        aux_weights=aux or {"load_balance": 0.0, "router_z": 0.0, "mutual_info": 0.0},
        sparse_layers=tuple(layers),
    )


def test_task_loss_is_the_mean_over_present_tasks_of_per_task_means():
    rng = np.random.default_rng(0)
    ce = rng.uniform(0.1, 3.0, size=12).astype(np.float32)
    task_ids = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0])  # task 1 absent
    weights = [1.0, 5.0, 0.5]
    loss, sums, counts = step.task_loss(
        jnp.asarray(ce), jnp.asarray(task_ids), settings(task_weights=weights)
    )
    # Reference: plain loop over the tasks that occur.
    means = {t: ce[task_ids == t].mean() for t in (0, 2)}
    expected = (weights[0] * means[0] + weights[2] * means[2]) / (weights[0] + weights[2])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(counts, [10, 0, 2])
    np.testing.assert_allclose(sums, [ce[task_ids == t].sum() for t in range(3)], rtol=1e-6)
    # Every task counts once, whatever its share of the batch: not the example mean.
    assert abs(float(loss) - ce.mean()) > 1e-3


def test_task_loss_of_a_batch_whose_tasks_all_weigh_zero_is_zero():
    loss, _, _ = step.task_loss(
        jnp.ones(4), jnp.zeros(4, jnp.int32), settings(task_weights=[0.0, 1.0, 1.0])
    )
    assert float(loss) == 0.0


def test_aux_loss_sums_layers_with_the_configured_weights():
    def layer_aux(lb, z, mi):
        return {
            "load_balance_loss": jnp.float32(lb),
            "router_z_loss": jnp.float32(z),
            "mutual_info_loss": jnp.float32(mi),
            "dropped_fraction": jnp.float32(0.1),
            "router_entropy": jnp.float32(1.0),
            "expert_counts": jnp.ones(4),
        }

    aux = {"block1/moe": layer_aux(1.0, 2.0, -0.5), "block3/moe": layer_aux(3.0, 4.0, -0.25)}
    weights = {"load_balance": 0.01, "router_z": 0.001, "mutual_info": 0.5}
    total, logged = step.aux_loss(aux, settings(aux=weights, layers=aux))
    np.testing.assert_allclose(total, 0.01 * 4.0 + 0.001 * 6.0 + 0.5 * -0.75, rtol=1e-6)
    np.testing.assert_allclose(logged["aux/router_z_loss"], 6.0)
    with pytest.raises(KeyError):  # a layer without a contract key is an error, not a 0
        step.aux_loss(
            {"block1/moe": {"load_balance_loss": jnp.float32(1)}},
            settings(aux=weights, layers=["block1/moe"]),
        )


def tiny_model(task_num_classes=(3, 2), task_modalities=("image", "tabular"), **overrides):
    """A one-block dense model of width 8 (MoE / MoA through `overrides`)."""
    kwargs = dict(token_shape=(4, 2), d_model=8, depth=1, num_heads=2, mlp_dim=16)
    return models.MultitaskTransformer(
        task_num_classes=task_num_classes,
        task_modalities=task_modalities,
        rngs=nnx.Rngs(0),
        **{**kwargs, **overrides},
    )


def tiny_setup(skip_nonfinite):
    model = tiny_model()
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    opt = ml_collections.ConfigDict(
        dict(
            learning_rate=0.05,
            warmup_steps=0,
            end_learning_rate_factor=1.0,
            b1=0.9,
            b2=0.99,
            weight_decay=0.0,
            grad_clip_norm=1.0,
        )
    )
    tx, schedule = state.make_optimizer(opt, 100)
    train_state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": model_state,
        "opt_state": tx.init(params),
    }
    fn = step.make_train_step(
        graphdef, tx, schedule, settings(num_tasks=2), skip_nonfinite=skip_nonfinite
    )
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32),
        "mask": jnp.ones((8, 4), bool),
        "label": jnp.asarray([0, 1, 2, 0, 1, 0, 1, 1]),
        "task_id": jnp.asarray([0, 1, 0, 1, 0, 1, 0, 1], jnp.int32),
    }
    return jax.jit(fn), train_state, batch


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    train_step, train_state, batch = tiny_setup(skip_nonfinite=False)
    losses = []
    for _ in range(30):
        train_state, m = train_step(train_state, batch)
        losses.append(float(m["loss"]))
    assert int(train_state["step"]) == 30
    assert losses[-1] < 0.5 * losses[0]


def test_a_nonfinite_step_is_skipped_when_configured():
    train_step, train_state, batch = tiny_setup(skip_nonfinite=True)
    # One good step first, so the Adam moments and count the skip must keep are not zeros.
    train_state, _ = train_step(train_state, batch)
    bad = dict(batch, inputs=batch["inputs"].at[0, 0, 0].set(jnp.nan))
    before = {key: jax.tree.leaves(train_state[key]) for key in ("params", "opt_state")}
    assert any(np.any(np.asarray(leaf) != 0) for leaf in before["opt_state"][1:])
    new_state, m = train_step(train_state, bad)
    assert bool(m["nonfinite"])
    for key, leaves in before.items():  # parameters and the whole optimizer state kept
        for old, new in zip(leaves, jax.tree.leaves(new_state[key]), strict=True):
            np.testing.assert_array_equal(old, new)
    assert int(new_state["step"]) == 2  # the batch is consumed all the same
    _, m = train_step(new_state, batch)
    assert not bool(m["nonfinite"])


def test_schedule_warms_up_then_decays_by_cosine():
    opt = config_lib.base_config().optimizer
    opt.learning_rate, opt.warmup_steps, opt.end_learning_rate_factor = 1.0, 10, 0.1
    _, schedule = state.make_optimizer(opt, 110)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1.0, rtol=1e-6)
    # Cosine from 1.0 to 0.1 over the 100 steps after warmup: halfway is the midpoint.
    np.testing.assert_allclose(schedule(60), 0.55, rtol=1e-5)
    np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-5)


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = tiny_model((3,), ("tabular",))
    params = nnx.state(model, nnx.Param)
    mask = step.weight_decay_mask(params)
    flat = {
        jax.tree_util.keystr(path): value
        for path, value in jax.tree_util.tree_leaves_with_path(mask)
    }
    decayed = {key for key, value in flat.items() if value}
    assert any("head_kernel" in key for key in decayed)
    assert any("fc_in" in key and "kernel" in key for key in decayed)
    assert not any("bias" in key or "embedding" in key or "scale" in key for key in decayed)


def test_train_meter_averages_an_interval():
    meter = metrics.TrainMeter(["a", "b"], ["block1/moe"])
    for loss, counts in ((1.0, [2, 0]), (3.0, [1, 3])):
        meter.add(
            {
                "loss": loss,
                "task_loss": loss,
                "grad_norm": 1.0,
                "learning_rate": 0.1,
                "nonfinite": False,
                "task_loss_sum": np.array([2.0 * counts[0], counts[1]]),
                "task_count": np.array(counts, float),
                "aux/load_balance_loss": loss,
                "block1/moe/dropped_fraction": 0.5 * loss,
                "block1/moe/router_entropy": 1.0,
                "block1/moe/expert_counts": np.array([3.0, 1.0]),
            }
        )
    out = meter.summary()
    assert out["train/loss"] == 2.0 and out["train/aux/load_balance_loss"] == 2.0
    assert out["train/a/loss"] == 2.0  # (2*2 + 2*1) / 3 examples
    assert out["train/b/loss"] == 1.0
    assert out["train/block1/moe/expert_load_max"] == 1.5  # 6/8 of the tokens x 2 experts
    assert out["train/dropped_fraction"] == 1.0


def test_metric_writer_appends_flat_records_and_truncates_on_resume(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    for s in (10, 20, 30):
        writer.write(s, {"train/loss": 1.0 / s, "eval/a/accuracy": float("nan")})
    writer.truncate_after(20)
    writer.close()
    history = metrics.read_history(str(tmp_path))
    assert [r["step"] for r in history] == [10, 20]
    assert history[0]["train/loss"] == 0.1 and history[0]["eval/a/accuracy"] == "nan"
    assert all(json.loads(line) for line in open(tmp_path / metrics.METRICS_FILE))
    events = os.listdir(tmp_path / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    metrics.MetricWriter(str(tmp_path / "other"), enabled=False).write(1, {"x": 1.0})
    assert not (tmp_path / "other").exists()


def test_results_table_lists_every_task_with_chance():
    scalars = {
        "eval/a/accuracy": 0.9,
        "eval/a/loss": 0.3,
        "eval/b/accuracy": 0.75,
        "eval/b/loss": 0.6,
        "eval/mean_accuracy": 0.825,
    }
    table = results_table(["a", "b"], [10, 2], ["image", "tabular"], {"eval": scalars})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["task", "modality", "classes", "chance"]
    assert lines[2].split() == ["a", "image", "10", "0.100", "0.900", "0.300"]
    assert lines[-1].split() == ["mean", "0.300", "0.825"]


def test_config_arg_and_weight_parsing():
    args = config_lib.parse_arg("routing=task,dropless", routing="tokens", dropless=False)
    assert args.routing == "task" and args.dropless is True
    with pytest.raises(ValueError, match="unknown config arg 'bogus'"):
        config_lib.parse_arg("bogus=1", routing="tokens")
    weights = config_lib.parse_weights("digits/class=1, wine=0.5", "data.tasks")
    assert weights == {"digits/class": 1.0, "wine": 0.5}
    assert config_lib.parse_weights(config_lib.format_weights(weights), "x") == weights
    with pytest.raises(ValueError, match="named twice"):
        config_lib.parse_weights("a=1, a=2", "data.tasks")
    with pytest.raises(ValueError, match="not a number"):
        config_lib.parse_weights("a=x", "data.tasks")


def test_optimizer_state_keeps_parameter_structure():
    _, params, _ = nnx.split(
        tiny_model((3,), ("image",)),
        nnx.Param,
        ...,
    )
    tx, _ = state.make_optimizer(config_lib.base_config().optimizer, 10)
    opt_state = tx.init(params)
    adam = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(params)


def test_mutual_information_loss_trains_when_a_task_is_missing_from_the_batch():
    """Mod-Squad's MI loss (weight > 0) with a task absent from the batch: its P(t) = 0 row
    must give finite gradients, not 0 * inf = NaN."""
    moe = models.MoESettings(
        num_experts=4,
        top_k=2,
        d_hidden=8,
        routing="per_task",
        router_init="zeros",
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    model = tiny_model((3, 2, 2), ("image",) * 3, depth=2, moe=moe, moe_every=2)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    tx, schedule = state.make_optimizer(config_lib.base_config().optimizer, 10)
    aux = {"load_balance": 0.0, "router_z": 0.0, "mutual_info": 0.005}
    fn = jax.jit(
        step.make_train_step(
            graphdef,
            tx,
            schedule,
            settings(num_tasks=3, aux=aux, layers=["block1/moe"]),
            skip_nonfinite=False,
        )
    )
    train_state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": model_state,
        "opt_state": tx.init(params),
    }
    batch = {
        "inputs": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 2)), jnp.float32),
        "mask": jnp.ones((6, 4), bool),
        "label": jnp.zeros(6, jnp.int32),
        "task_id": jnp.asarray([0, 2, 0, 2, 0, 2], jnp.int32),
    }  # task 1 absent
    _, m = fn(train_state, batch)
    assert np.isfinite(float(m["aux/mutual_info_loss"]))
    assert np.isfinite(float(m["grad_norm"])), "NaN gradient from the MI loss"


def test_masks_bound_as_constants_and_passed_as_inputs_give_the_same_step():
    """The one step serves a warm start (numpy masks bound at trace time, whole leaves
    picked statically) and evolution's children (the same masks as traced inputs): equal
    results, frozen rows and leaves bit for bit their old values, the rest moved."""
    train_step, train_state, batch = tiny_setup(skip_nonfinite=False)
    fn = train_step.__wrapped__  # the step before jit
    params, model_state = train_state["params"], train_state["model_state"]

    def mask_of(path, leaf):
        name = jax.tree_util.keystr(path)
        if "head" in name and np.ndim(leaf) >= 1:  # per-row: task 1's rows train
            rows = np.zeros(np.shape(leaf)[0], bool)
            rows[1:] = True
            return rows.reshape((-1,) + (1,) * (np.ndim(leaf) - 1))
        return np.asarray("embed" not in name)  # embeddings frozen whole

    masks = {
        "params": jax.tree_util.tree_map_with_path(mask_of, params),
        "model_state": jax.tree.map(lambda _: np.ones((), bool), model_state),
    }
    static = jax.jit(lambda s, b: fn(s, b, masks))
    traced = jax.jit(fn)
    expected, _ = static(train_state, batch)
    got, _ = traced(train_state, batch, jax.tree.map(jnp.asarray, masks))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = 0
    for old, new, m in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(got["params"]),
        jax.tree.leaves(masks["params"]),
        strict=True,
    ):
        frozen = ~np.broadcast_to(m, np.shape(old))
        np.testing.assert_array_equal(np.asarray(new)[frozen], np.asarray(old)[frozen])
        moved += int((np.asarray(new) != np.asarray(old))[~frozen].sum())
    assert moved > 0


@pytest.mark.parametrize("in_state", [False, True], ids=["schedule", "rate_in_state"])
def test_adamw_decays_matrices_only_whether_or_not_the_rate_is_state(in_state):
    """With zero gradients the update is -lr * decay * p on matrices and 0 on vectors,
    for a run's optimizer and for an evolution child's (rate as optimizer state): a decay
    mask taken for a schedule would decay nothing."""
    params = {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    tx = state.adamw(0.1, weight_decay=0.5, learning_rate_in_state=in_state)
    opt_state = tx.init(params)
    if in_state:
        opt_state = state.with_learning_rate(opt_state, 0.2)
    lr = 0.2 if in_state else 0.1
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
    np.testing.assert_allclose(updates["kernel"], -lr * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
