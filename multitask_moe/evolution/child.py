"""Training one child path: training's step (core/step.py) with the frozen mask and
the learning rate as inputs, so every child of one architecture runs one compiled program.

    steps = ChildSteps.build(graphdef, sparse_layers, aux_weights, weight_decay)
    result = train(steps, state, opt_state, trainable, batches, validate, ...)

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

from multitask_moe.core.state import adamw
from multitask_moe.core.step import AUX_LOSSES, LossSettings, make_train_step


@dataclasses.dataclass(frozen=True)
class ChildSteps:
    """The jitted train and eval steps of one architecture.

    train_step(state, opt_state, batch, trainable) -> (state, opt_state, task loss) is
    training's one step (core/step.py) with the child's masks as traced inputs and its
    learning rate in opt_state (state.adamw(learning_rate_in_state=True)); state here is
    {"params", "model_state"}, the optimizer state beside it.
    """

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
        tx = adamw(1e-3, weight_decay=weight_decay, learning_rate_in_state=True)
        step = make_train_step(graphdef, tx, None, settings, skip_nonfinite=False)

        def train_step(state, opt_state, batch, trainable):
            # The step counter only feeds a schedule; a child's rate is in opt_state.
            full = {"step": jnp.zeros((), jnp.int32), **state, "opt_state": opt_state}
            new, metrics = step(full, batch, trainable)
            kept = {"params": new["params"], "model_state": new["model_state"]}
            return kept, new["opt_state"], metrics["task_loss"]

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


def finite_rows(state, count: int | None):
    """Whether every leaf of the state is finite: a bool, or bool [count] per leading row."""
    if count is None:
        return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(state)]))
    rows = [jnp.isfinite(x).reshape(count, -1).all(axis=1) for x in jax.tree.leaves(state)]
    return jnp.stack(rows).all(axis=0)
