"""Auxiliary losses and routing metrics, computed from summable statistics.

Every statistic is a sum over tokens, so a sharded layer sums them over its batch shards
(one psum) and finalizes exactly the values one device would get for the global batch.

Shapes: N tokens, E experts, T tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MI_EPS = 1e-4  # inside the log, as in Mod-Squad: keeps log finite where P(t, e) = 0


def router_stats(
    logits: jax.Array,
    probs: jax.Array,
    kept: jax.Array,
    chosen: jax.Array,
    task_ids: jax.Array | None,
    num_tasks: int | None,
    valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Sums over the real tokens. logits, probs, kept, chosen [N, E] float32; task_ids [N]
    or None; valid [N] bool or None (all real): padding enters no statistic."""
    weight = (
        jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    )  # [N]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [N]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    real_probs = probs * weight[:, None]  # [N, E]
    stats = {
        "num_tokens": jnp.sum(weight),
        "prob_sum": jnp.sum(real_probs, axis=0),  # [E]
        "chosen_count": jnp.sum(chosen, axis=0),  # [E] (padding chooses nothing)
        "kept_count": jnp.sum(kept, axis=0),  # [E]
        "tokens_with_no_expert": jnp.sum(weight * (jnp.sum(kept, axis=-1) == 0)),
        "z_sum": jnp.sum(weight * jnp.square(log_z)),
        "entropy_sum": -jnp.sum(real_probs * log_probs),
        "top_prob_sum": jnp.sum(weight * jnp.max(probs, axis=-1)),
    }
    if task_ids is not None:
        task_one_hot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32)  # [N, T]
        task_one_hot = task_one_hot * weight[:, None]
        stats["task_prob_sum"] = task_one_hot.T @ probs  # [T, E]: S[t, e] of Mod-Squad
        stats["task_kept_count"] = task_one_hot.T @ kept  # [T, E]
        stats["task_chosen_count"] = task_one_hot.T @ chosen  # [T, E]: before capacity
    return stats


def mutual_info_loss(task_prob_sum: jax.Array) -> jax.Array:
    """-I(T; E) of Mod-Squad from S[t, e] = sum over tokens of task t of p(e) [T, E].

    P(t, e) = S / sum(S); L = -sum P(t, e) log(P(t, e) / (P(t) P(e)) + eps).
    """
    total = jnp.sum(task_prob_sum)
    joint = task_prob_sum / jnp.where(total > 0, total, 1.0)  # no tokens at all: loss 0
    p_task = jnp.sum(joint, axis=1, keepdims=True)  # [T, 1]
    p_expert = jnp.sum(joint, axis=0, keepdims=True)  # [1, E]
    # Tasks absent from the batch have P(t) = 0 and their cells contribute 0 (0 * log(eps)).
    # Both wheres keep the gradient finite there: a clamped denominator (tiny^2 underflows
    # to 0) would put 0 / 0 into the backward pass even though the value is fine.
    independent = p_task * p_expert
    safe = jnp.where(independent > 0, independent, 1.0)
    terms = jnp.where(joint > 0, joint * jnp.log(joint / safe + MI_EPS), 0.0)
    return -jnp.sum(terms)


def aux_from_stats(stats: dict[str, jax.Array], *, choice: str) -> dict[str, jax.Array]:
    """Finalize global sums into the layer's aux dict.

    load_balance_loss: Switch's E * sum_e f_e * P_e, with f_e the fraction of router choices
      (all K per token) that went to e, and P_e the mean router probability of e. 1 when
      perfectly balanced.
    dropped_fraction: token choice: chosen assignments that found no slot; expert choice:
      tokens that no expert took.
    """
    num_tokens = jnp.maximum(stats["num_tokens"], 1.0)  # a batch of padding only: all 0
    num_experts = stats["prob_sum"].shape[0]
    choice_fraction = stats["chosen_count"] / jnp.maximum(jnp.sum(stats["chosen_count"]), 1.0)
    mean_prob = stats["prob_sum"] / num_tokens
    if choice == "experts":
        dropped = stats["tokens_with_no_expert"] / num_tokens
    else:
        dropped = 1.0 - jnp.sum(stats["kept_count"]) / jnp.maximum(
            jnp.sum(stats["chosen_count"]), 1.0
        )
    aux = {
        "load_balance_loss": num_experts * jnp.sum(choice_fraction * mean_prob),
        "router_z_loss": stats["z_sum"] / num_tokens,
        "mutual_info_loss": jnp.zeros((), jnp.float32),
        "dropped_fraction": dropped,
        "router_entropy": stats["entropy_sum"] / num_tokens,
        "router_confidence": stats["top_prob_sum"] / num_tokens,
        "expert_counts": stats["kept_count"],
    }
    if "task_prob_sum" in stats:
        aux["mutual_info_loss"] = mutual_info_loss(stats["task_prob_sum"])
        aux["task_expert_counts"] = stats["task_kept_count"]
        aux["task_chosen_counts"] = stats["task_chosen_count"]
    return aux
