"""The train and eval steps: pure functions of (state, batch), jitted once by the loop.

The model is rebuilt from (graphdef, params, model_state) inside the traced function, so
the NNX object graph is walked once, at trace time; each later call is a plain jax.jit
dispatch over arrays (no Python traversal of the module tree per step).

Shape legend: B global batch, L tokens, P features per token, C largest class count,
T tasks, E experts of one sparse layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from multitask_moe.models.surgery import keep_frozen
from multitask_moe.moe.usage import effective_experts

# Scalar entries of a sparse layer's aux that become losses, by config weight name.
AUX_LOSSES = {
    "load_balance": "load_balance_loss",
    "router_z": "router_z_loss",
    "mutual_info": "mutual_info_loss",
}
# Scalar entries averaged over layers for the logs.
AUX_STATS = ("dropped_fraction", "router_entropy")
TASK_WEIGHTINGS = ("fixed", "uncertainty")

# The arrays of a batch the steps read: training, and evaluation (+ which rows are real).
TRAIN_KEYS = ("inputs", "mask", "label", "task_id")
EVAL_KEYS = TRAIN_KEYS + ("valid",)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """What the loss needs to know about the tasks and the aux losses."""

    num_tasks: int
    task_weights: tuple[float, ...]  # [T], 1.0 for tasks the config does not name
    aux_weights: Mapping[str, float]  # keys of AUX_LOSSES
    sparse_layers: tuple[str, ...]  # aux keys of the model, e.g. "block1/moe"
    task_weighting: str = "fixed"  # one of TASK_WEIGHTINGS


def per_task_sums(
    values: jax.Array, task_ids: jax.Array, weights: jax.Array, num_tasks: int
) -> tuple[jax.Array, jax.Array]:
    """values [B], task_ids [B], weights [B] -> (sum of weight*value per task [T],
    sum of weights per task [T])."""
    one_hot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32) * weights[:, None]  # [B, T]
    # Multiply-and-reduce rather than a matmul: a reduction over the batch-sharded axis has
    # an unambiguous (replicated) result under Explicit mesh axes; a contraction does not.
    sums = jnp.sum(one_hot * values.astype(jnp.float32)[:, None], axis=0)  # [T]
    return sums, one_hot.sum(0)


def task_loss(
    cross_entropy: jax.Array,
    task_ids: jax.Array,
    settings: LossSettings,
    loss_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean over the tasks present in the batch of each task's (weighted) mean loss.

    Each task counts once whatever its share of the batch (the mixture rates already set
    how often it is seen); optional task weights scale that. With loss_scale s [T]
    (uncertainty weighting, Mod-Squad) task t contributes 0.5 / s_t^2 * L_t + log(1 + s_t^2)
    in place of L_t. Returns (loss, per-task sums [T], per-task counts [T]).
    """
    ones = jnp.ones_like(cross_entropy, jnp.float32)
    sums, counts = per_task_sums(cross_entropy, task_ids, ones, settings.num_tasks)
    present = counts > 0
    weights = jnp.asarray(settings.task_weights, jnp.float32) * present  # [T]
    means = sums / jnp.maximum(counts, 1.0)  # [T]
    if loss_scale is not None:
        variance = jnp.square(loss_scale.astype(jnp.float32))  # [T]
        means = 0.5 / variance * means + jnp.log1p(variance)
    total_weight = weights.sum()
    # A batch whose present tasks all weigh 0 contributes nothing (not 0/0).
    loss = jnp.where(
        total_weight > 0, (weights * means).sum() / jnp.maximum(total_weight, 1e-12), 0.0
    )
    return loss, sums, counts


def aux_loss(
    aux: Mapping[str, Mapping[str, jax.Array]], settings: LossSettings
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum over layers of the aux losses, and the logged aux statistics."""
    total = jnp.zeros((), jnp.float32)
    logged = {}
    for weight_name, aux_name in AUX_LOSSES.items():
        # Every layer of the contract reports these keys: a missing one is a KeyError.
        summed = sum(
            (aux[layer][aux_name].astype(jnp.float32) for layer in settings.sparse_layers),
            jnp.zeros((), jnp.float32),
        )
        logged[f"aux/{aux_name}"] = jax.lax.stop_gradient(summed)
        weight = settings.aux_weights[weight_name]
        if weight:
            # Only losses in use enter the gradient: 0 * (a NaN gradient, e.g. a log at an
            # unused corner of a loss) is still NaN.
            total = total + weight * summed
    for layer in settings.sparse_layers:
        for name in AUX_STATS:
            logged[f"{layer}/{name}"] = aux[layer][name].astype(jnp.float32)
        logged[f"{layer}/expert_counts"] = aux[layer]["expert_counts"].astype(jnp.float32)
    return total, logged


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array] | None,
    settings: LossSettings,
    *,
    skip_nonfinite: bool,
) -> Callable[..., tuple[dict, dict]]:
    """Returns train_step(state, batch, trainable=None) -> (new state, metrics): the one
    step of training, of a warm start's frozen rows and of every evolution child.

    state: {"step", "params", "model_state", "opt_state"}; batch: inputs [B, L, P] f32,
    mask [B, L] bool, label [B] int32, task_id [B] int32. Metrics are device arrays (the
    loop fetches them in bulk, so the host never waits on a step).
    trainable: None (everything trains), or {"params": masks, "model_state": masks},
    trees of bool masks that broadcast against their leaves: frozen parameters get zero
    gradient (outside the clipped norm) and keep their values exactly; frozen statistics
    keep theirs. Bound as numpy constants (functools.partial: a warm start's fixed
    masks), a whole-leaf mask costs nothing; passed as arrays, the masks are traced, so
    one compiled step serves every child of an evolution architecture whatever it locks.
    schedule: the learning rate by step, logged as `learning_rate`; None when the rate is
    optimizer state (optimizer.adamw(learning_rate_in_state=True), a child's own rate).
    """

    def loss_fn(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state)
        logits, aux = model(
            batch["inputs"], batch["mask"], batch["task_id"], deterministic=False
        )  # [B, C] f32
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["label"]
        )  # [B]
        loss_scale = (
            model.task_loss_scale[...] if settings.task_weighting == "uncertainty" else None
        )
        main, task_sums, task_counts = task_loss(
            cross_entropy, batch["task_id"], settings, loss_scale
        )
        extra, logged = aux_loss(aux, settings)
        if loss_scale is not None:
            logged["task_loss_scale"] = jax.lax.stop_gradient(loss_scale)
        # Router noise rng counters and any other non-parameter state move on.
        new_model_state = nnx.state(model, nnx.Not(nnx.Param))
        metrics = {
            "task_loss": main,
            "task_loss_sum": task_sums,
            "task_count": task_counts,
            **logged,
        }
        return main + extra, (metrics, new_model_state, jax.lax.stop_gradient(aux))

    def record_usage(params, model_state, aux) -> tuple[nnx.State, dict[str, jax.Array]]:
        """The usage EMAs moved one step (training only: evaluation never moves them),
        outside the differentiated function, whose trace may not mutate the state."""
        model = nnx.merge(graphdef, params, model_state)
        model.record_usage(aux)
        logged = {
            f"{name}/effective_experts": effective_experts(layer.usage[...])
            for name, layer in model.sparse_layers().items()
            if layer.usage is not None
        }
        return nnx.state(model, nnx.Not(nnx.Param)), logged

    def train_step(state, batch, trainable=None):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, new_model_state, aux)), grads = grad_fn(
            state["params"], state["model_state"], batch
        )
        new_model_state, usage_metrics = record_usage(state["params"], new_model_state, aux)
        metrics.update(usage_metrics)
        if trainable is not None:
            zeros = jax.tree.map(jnp.zeros_like, grads)
            grads = keep_frozen(grads, zeros, trainable["params"])
        updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        if trainable is not None:  # p + 0 may flip the sign of a zero: keep the old value
            new_params = keep_frozen(new_params, state["params"], trainable["params"])
            new_model_state = keep_frozen(
                new_model_state, state["model_state"], trainable["model_state"]
            )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {
            "params": new_params,
            "model_state": new_model_state,
            "opt_state": new_opt_state,
        }
        if skip_nonfinite:
            old_state = {key: state[key] for key in new_state}
            new_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), new_state, old_state
            )
        # The step counts batches consumed, skipped or not, so a resumed run reads on from
        # the right batch.
        new_state["step"] = state["step"] + 1
        metrics.update(loss=loss, grad_norm=grad_norm, nonfinite=~finite)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state["step"])
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, num_tasks: int, sparse_layers: Sequence[str]
) -> Callable[[dict, dict], dict]:
    """Returns eval_step(state, batch) -> per-task sums over the valid examples.

    batch: as for training plus valid [B] bool (padding examples of the last batch are
    False). Output: loss_sum [T], correct_sum [T], count [T], and task_expert_counts
    (kept) and task_chosen_counts (top-k choices) [T, E] per sparse layer (routing of
    every token of the batch, padding examples included).
    """

    def eval_step(state, batch):
        model = nnx.merge(graphdef, state["params"], state["model_state"])
        logits, aux = model(batch["inputs"], batch["mask"], batch["task_id"], deterministic=True)
        valid = batch["valid"].astype(jnp.float32)  # [B]
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)  # [B]
        loss_sum, count = per_task_sums(cross_entropy, batch["task_id"], valid, num_tasks)
        correct_sum, _ = per_task_sums(correct, batch["task_id"], valid, num_tasks)
        out = {"loss_sum": loss_sum, "correct_sum": correct_sum, "count": count}
        for layer in sparse_layers:
            for name in ("task_expert_counts", "task_chosen_counts"):
                out[f"{layer}/{name}"] = aux[layer][name].astype(jnp.float32)
        return out

    return eval_step


def sum_trees(total: dict | None, new: dict) -> dict:
    """Running sum of eval outputs (on device: no host round trip per batch)."""
    return new if total is None else jax.tree.map(jnp.add, total, new)


def weight_decay_mask(params) -> object:
    """True for matrices (kernels, expert weights, routers); False for biases, norms,
    the [L, D] / [T, D] embedding tables, which decay toward nothing useful, and the
    uncertainty scales s_t [T]: decay would pull s_t toward 0, i.e. raise every task's
    weight 0.5 / s_t^2 over training, a drift unrelated to the tasks' noise."""

    def decays(path, leaf):
        name = jax.tree_util.keystr(path)
        return np.ndim(leaf) >= 2 and "embedding" not in name and "bias" not in name

    return jax.tree_util.tree_map_with_path(decays, params)
