"""Which seen task a new task should start from: how well each seen task's predictions
carry the new task's labels.

A seen task c owns rows (task embedding, routing rows, per-task routers, head) that make
the trained model compute c's function. Run on the new task's training examples *as if
they were task c's*, the model gives c's predicted class distribution p_c(x) over c's own
classes. The nearest task is the one whose predictions best predict the new labels:

    p_c(x) = softmax(model(x, task=c)) over c's classes            # [N, C_c]
    score_c = min over a few L2 strengths of the K-fold cross-validated cross-entropy of
              a multinomial logistic regression p_c(x) -> new label

(lower is better). A digit's parity is a linear function of the digit-class probabilities
(the sum over even digits), and a task of a related synthetic teacher family shares most
of its decision function, so related tasks score low while unrelated ones stay near the
new task's chance level. Probabilities rather than the trunk's pooled features: a probe on
D-dimensional features has to learn c's head again from a few examples, and in our
measurements (docs/lifecycle.md) it picked unrelated tasks as often as related ones. The
cross-validation and the per-candidate best strength keep a candidate with more classes
(more probe inputs) from winning by fitting the few examples in-sample. The probe is
small (C_c x C weights, full-batch Adam, every fold and strength at once under vmap): a
candidate costs one forward pass of the examples and a fraction of a second.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from multitask_moe.models import INVALID_CLASS_LOGIT

FOLDS = 5
PROBE_STEPS = 300
PROBE_LEARNING_RATE = 0.05
PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0)  # strengths tried (times the squared weight norm)


def predictions_fn(graphdef: nnx.GraphDef, mesh):
    """jitted (params, model_state, batch, task_id) -> (the task's predicted distribution
    [B, C] (0 past its classes), label [B], valid [B]), replicated so that every process
    sees the whole batch."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def run(params, model_state, batch, task_id):
        model = nnx.merge(graphdef, params, model_state)
        task_ids = jnp.full_like(batch["label"], task_id)
        logits, _ = model(batch["inputs"], batch["mask"], task_ids, deterministic=True)
        own = logits > INVALID_CLASS_LOGIT / 2  # [B, C] the task's own classes
        probs = jax.nn.softmax(jnp.where(own, logits, -jnp.inf), axis=-1)
        return probs, batch["label"], batch["valid"]

    return jax.jit(run, out_shardings=(replicated, replicated, replicated))


def candidate_predictions(
    forward, state: dict, batches: Sequence[dict], candidates: Sequence[int], limit: int
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """({candidate: predicted distribution float32 [N, C]}, labels int32 [N]) of the first
    `limit` valid examples of `batches` (global batches of the new task's examples)."""
    features = {c: [] for c in candidates}
    labels = []
    for batch in batches:
        for c in candidates:
            x, y, valid = jax.device_get(
                forward(state["params"], state["model_state"], batch, np.int32(c))
            )
            features[c].append(np.asarray(x)[np.asarray(valid)])
            if c == candidates[0]:
                labels.append(np.asarray(y)[np.asarray(valid)])
    labels = np.concatenate(labels)[:limit]
    return {c: np.concatenate(f)[:limit] for c, f in features.items()}, labels


def _fold_loss(features, labels, train, l2, num_classes):  # features [N, F]
    """Held-out summed cross-entropy and correct count of one fold (train: bool [N])."""
    weights = train.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    mean = (features * weights[:, None]).sum(0) / count
    var = (((features - mean) ** 2) * weights[:, None]).sum(0) / count
    x = (features - mean) / jnp.sqrt(var + 1e-6)  # [N, D]
    onehot = jax.nn.one_hot(labels, num_classes)
    params = {
        "w": jnp.zeros((x.shape[1], num_classes)),
        "b": jnp.zeros((num_classes,)),
    }
    tx = optax.adam(PROBE_LEARNING_RATE)

    def loss(params):
        logits = x @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy(logits, onehot)
        return (ce * weights).sum() / count + l2 * jnp.sum(params["w"] ** 2)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=PROBE_STEPS)
    logits = x @ params["w"] + params["b"]
    held_out = 1.0 - weights
    ce = optax.softmax_cross_entropy(logits, onehot)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return (ce * held_out).sum(), (correct * held_out).sum()


@functools.partial(jax.jit, static_argnames="num_classes")
def probe_score(features: jax.Array, labels: jax.Array, num_classes: int):
    """(held-out cross-entropy, held-out accuracy) of the linear probe at its best L2
    strength, FOLDS-fold, each example held out once (fold of example i: i mod FOLDS)."""
    n = features.shape[0]
    folds = jnp.arange(n) % FOLDS
    train = folds[None, :] != jnp.arange(FOLDS)[:, None]  # [FOLDS, N]
    per_fold = jax.vmap(_fold_loss, in_axes=(None, None, 0, None, None))  # over folds
    per_strength = jax.vmap(per_fold, in_axes=(None, None, None, 0, None))  # over L2
    losses, correct = per_strength(features, labels, train, jnp.asarray(PROBE_L2), num_classes)
    losses, correct = losses.sum(1) / n, correct.sum(1) / n  # [strengths]
    best = jnp.argmin(losses)
    return losses[best], correct[best]


def scores(
    features: dict[int, np.ndarray], labels: np.ndarray, num_classes: int, names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """{candidate name: {"loss", "accuracy"}} of every candidate (names[c] names id c)."""
    out = {}
    for c, x in features.items():
        loss, accuracy = probe_score(jnp.asarray(x), jnp.asarray(labels), num_classes)
        out[names[c]] = {"loss": float(loss), "accuracy": float(accuracy)}
    return out


def nearest(task_scores: dict[str, dict[str, float]]) -> str:
    """The candidate with the lowest held-out loss (the first of equals)."""
    return min(task_scores, key=lambda name: task_scores[name]["loss"])
