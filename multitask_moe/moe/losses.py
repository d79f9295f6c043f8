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
) -> dict[str, jax.Array]:
  """Sums over tokens. logits, probs, kept, chosen [N, E] float32; task_ids [N] or None."""
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [N]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  stats = {
      "num_tokens": jnp.asarray(logits.shape[0], jnp.float32),
      "prob_sum": jnp.sum(probs, axis=0),  # [E]
      "chosen_count": jnp.sum(chosen, axis=0),  # [E]
      "kept_count": jnp.sum(kept, axis=0),  # [E]
      "tokens_with_no_expert": jnp.sum(jnp.sum(kept, axis=-1) == 0).astype(jnp.float32),
      "z_sum": jnp.sum(jnp.square(log_z)),
      "entropy_sum": -jnp.sum(probs * log_probs),
      "top_prob_sum": jnp.sum(jnp.max(probs, axis=-1)),
  }
  if task_ids is not None:
    task_one_hot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32)  # [N, T]
    stats["task_prob_sum"] = task_one_hot.T @ probs  # [T, E]: S[t, e] of Mod-Squad
    stats["task_kept_count"] = task_one_hot.T @ kept  # [T, E]
  return stats


def mutual_info_loss(task_prob_sum: jax.Array) -> jax.Array:
  """-I(T; E) of Mod-Squad from S[t, e] = sum over tokens of task t of p(e) [T, E].

  P(t, e) = S / sum(S); L = -sum P(t, e) log(P(t, e) / (P(t) P(e)) + eps).
  """
  joint = task_prob_sum / jnp.sum(task_prob_sum)
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
  num_tokens = stats["num_tokens"]
  num_experts = stats["prob_sum"].shape[0]
  choice_fraction = stats["chosen_count"] / jnp.maximum(jnp.sum(stats["chosen_count"]), 1.0)
  mean_prob = stats["prob_sum"] / num_tokens
  if choice == "experts":
    dropped = stats["tokens_with_no_expert"] / num_tokens
  else:
    dropped = 1.0 - jnp.sum(stats["kept_count"]) / jnp.maximum(
        jnp.sum(stats["chosen_count"]), 1.0)
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
  return aux
