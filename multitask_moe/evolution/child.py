"""Training one child path: steps that take the frozen mask and the learning rate as
inputs, so every child of one architecture runs the same compiled program.

    steps = ChildSteps.build(graphdef, fresh, sparse_layers, aux_weights)
    result = train(steps, state, trainable, hparams, batches, validate, ...)

A leaf of a locked component gets a zero gradient and keeps its exact value (a select,
never `p + 0`, which may flip the sign of a zero), its statistics too; the clipped norm
counts only trainable leaves. Quality is the best validation accuracy over several
validations during training, and the parameters of that point are the ones kept (muNet).

Shapes: B batch, L tokens, P features per token, C classes of the task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from multitask_moe.evolution import path_model
from multitask_moe.train.step import AUX_LOSSES, LossSettings, aux_loss, weight_decay_mask


def optimizer(weight_decay: float, grad_clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with the learning rate as state (set per child, no recompile), after clipping."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-3, weight_decay=weight_decay, mask=weight_decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)


def with_learning_rate(opt_state, learning_rate: float):
    """opt_state (of `optimizer`) with its injected learning rate replaced."""
    clip, adamw = opt_state
    hyperparams = dict(adamw.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
    return clip, adamw._replace(hyperparams=hyperparams)


def select(mask, new, old):
    """new where the mask (a scalar, or per expert slot broadcast over the leaf) is True,
    else old (typed PRNG keys through their data)."""
    if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
        data = jnp.where(mask, jax.random.key_data(new), jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(mask, new, old)


@dataclasses.dataclass(frozen=True)
class ChildSteps:
    """The jitted train and eval steps of one architecture."""

    train_step: Callable
    eval_step: Callable
    tx: optax.GradientTransformation
    # The same steps over a stack of children [g, ...] (one per device when the stack is
    # sharded over them); the eval batch is shared: every child of a generation has the
    # same task.
    train_steps: Callable
    eval_steps: Callable

    @classmethod
    def build(
        cls,
        graphdef: nnx.GraphDef,
        sparse_layers: tuple[str, ...],
        aux_weights: Mapping[str, float],
        weight_decay: float,
    ) -> ChildSteps:
        settings = LossSettings(
            num_tasks=1,
            task_weights=(1.0,),
            aux_weights={name: float(aux_weights.get(name, 0.0)) for name in AUX_LOSSES},
            sparse_layers=sparse_layers,
        )
        tx = optimizer(weight_decay)

        def loss_fn(params, model_state, batch):
            model = nnx.merge(graphdef, params, model_state)
            logits, aux = model(
                batch["inputs"], batch["mask"], batch["task_id"], deterministic=False
            )  # [B, C]
            task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            extra, _ = aux_loss(aux, settings)
            new_model_state = nnx.state(model, nnx.Not(nnx.Param))  # rng streams moved on
            return task + extra, (task, new_model_state, jax.lax.stop_gradient(aux))

        def train_step(state, opt_state, batch, trainable):
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, (task, model_state, aux)), grads = grad_fn(
                state["params"], state["model_state"], batch
            )
            # The usage statistics move outside the differentiated function (train/step.py).
            model = nnx.merge(graphdef, state["params"], model_state)
            model.record_usage(aux)
            model_state = nnx.state(model, nnx.Not(nnx.Param))
            grads = jax.tree.map(
                lambda m, g: jnp.where(m, g, jnp.zeros_like(g)), trainable["params"], grads
            )
            updates, opt_state = tx.update(grads, opt_state, state["params"])
            params = optax.apply_updates(state["params"], updates)
            params = jax.tree.map(select, trainable["params"], params, state["params"])
            model_state = jax.tree.map(
                select, trainable["model_state"], model_state, state["model_state"]
            )
            return {"params": params, "model_state": model_state}, opt_state, task

        def eval_step(state, batch):
            model = nnx.merge(graphdef, state["params"], state["model_state"])
            logits, _ = model(batch["inputs"], batch["mask"], batch["task_id"], deterministic=True)
            correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["valid"]
            return jnp.sum(correct), jnp.sum(batch["valid"]), logits

        return cls(
            jax.jit(train_step),
            jax.jit(eval_step),
            tx,
            jax.jit(jax.vmap(train_step)),
            jax.jit(jax.vmap(eval_step, in_axes=(0, None))),
        )


def pure_mask(trainable: Mapping[str, object], state: Mapping[str, nnx.State]) -> dict:
    """The pure-dict masks of path_model.leaf_trainable in the structure of `state`."""
    out = {}
    for kind in ("params", "model_state"):
        like = jax.tree.map(lambda _: np.bool_(False), state[kind])
        nnx.replace_by_pure_dict(like, trainable[kind])
        out[kind] = like
    return out


def accuracy(steps: ChildSteps, state, batches: Iterator[dict[str, np.ndarray]]) -> float:
    """Accuracy over every valid example of `batches`."""
    correct = total = 0
    for batch in batches:
        c, n, _ = steps.eval_step(state, batch)
        correct, total = correct + int(c), total + int(n)
    return correct / max(total, 1)


def logits_of(steps: ChildSteps, state, batches) -> np.ndarray:
    """[N, C] float32 logits of the valid examples of `batches`, in order."""
    out = []
    for batch in batches:
        _, _, logits = steps.eval_step(state, batch)
        out.append(np.asarray(logits)[np.asarray(batch["valid"])])
    return np.concatenate(out)


@dataclasses.dataclass
class Trained:
    state: dict  # the parameters at the best validation
    opt_state: object
    quality: float  # best validation accuracy
    losses: list[float]
    # The first step (1-based) whose loss was not finite, or, if only the parameters
    # turned non-finite, the validation that found them; the parameters kept are those
    # of the best validation before, so no NaN ever enters the component pool.
    diverged_at: int | None = None


def first_nonfinite_step(losses: list[float]) -> int | None:
    """1-based index of the first non-finite loss, or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses, np.float64)))
    return int(bad[0]) + 1 if bad.size else None


def train(
    steps: ChildSteps,
    state: dict,
    opt_state,
    trainable: dict,
    batches: Iterator[dict[str, np.ndarray]],
    validate: Callable[[dict], float],
    *,
    num_steps: int,
    validations: int,
) -> Trained:
    """`num_steps` steps; validates `validations` times (evenly, the last at the end) and
    keeps the best point. A non-finite loss or parameter ends the child: it keeps its best
    point before (quality 0 if it never validated), as a child of together.train does."""
    every = max(num_steps // max(validations, 1), 1)
    best = Trained(state, opt_state, -1.0, [])
    losses = []
    for step in range(1, num_steps + 1):
        state, opt_state, loss = steps.train_step(state, opt_state, next(batches), trainable)
        losses.append(loss)
        if step % every == 0 or step == num_steps:
            # Every loss since the last validation, and the parameters: an update from
            # non-finite gradients spoils them while the loss it reports is still finite.
            finite_losses = np.isfinite(np.asarray(jnp.stack(losses[-every:]))).all()
            if not (finite_losses and bool(finite_rows(state, None))):
                history = [float(v) for v in losses]
                quality = max(best.quality, 0.0)
                diverged = first_nonfinite_step(history) or step
                return Trained(best.state, best.opt_state, quality, history, diverged)
            quality = validate(state)
            if quality > best.quality:
                best = Trained(state, opt_state, quality, [])
    best.losses = [float(v) for v in losses]
    return best


def adam_moment_key(key_path) -> tuple[str, tuple] | None:
    """("mu" | "nu", parameter path) of an Adam moment leaf of `optimizer`'s state; None
    for other leaves (the step count, the injected hyperparameters)."""
    names = [getattr(k, "name", None) for k in key_path]
    for slot in ("mu", "nu"):
        if slot in names:
            index = names.index(slot)
            return slot, path_model.key_names(key_path[index + 1 :])
    return None


def finite_rows(state, count: int | None):
    """Whether every leaf of the state is finite: a bool, or bool [count] per leading row."""
    if count is None:
        return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(state)]))
    rows = [jnp.isfinite(x).reshape(count, -1).all(axis=1) for x in jax.tree.leaves(state)]
    return jnp.stack(rows).all(axis=0)
