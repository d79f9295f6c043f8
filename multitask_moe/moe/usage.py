"""Which experts each task uses: an exponential moving average of routing counts.

Every MoE and MoA layer built with task ids keeps `usage` [T, E]: for each task t and
expert e, an EMA of the number of the task's tokens whose top-k chose e (before any
capacity drop). It starts at 0 and is updated by training only (`record_usage` from the
train step, never by evaluation), so it describes the routing the model learned, and it
is what extraction reads to decide which experts a task keeps (Mod-Squad). A zero start
scales every entry of a row by the same 1 - decay^n, so shares are unbiased from step 1.

Shape legend: T tasks, E experts of the layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Usage(nnx.Variable):
    """[T, E] EMA of per-task expert choices; state, not a parameter (no gradient)."""


def check_decay(decay) -> None:
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
        raise ValueError(f"usage_ema_decay={decay!r} must be a number in [0, 1)")


def usage_table(num_tasks: int | None, num_experts: int) -> Usage | None:
    """A zero [T, E] table, or None for a layer without tasks."""
    if num_tasks is None:
        return None
    return Usage(jnp.zeros((num_tasks, num_experts), jnp.float32), task_axis=0, expert_axis=1)


class TracksUsage:
    """Mixin of the sparse layers: `usage` (or None) and `usage_ema_decay` set by __init__."""

    usage: Usage | None
    usage_ema_decay: float

    def record_usage(self, aux: dict[str, jax.Array]) -> None:
        """Moves the EMA one step with this step's aux["task_chosen_counts"] [T, E]."""
        if self.usage is None:
            return
        counts = jax.lax.stop_gradient(aux["task_chosen_counts"]).astype(jnp.float32)
        decay = self.usage_ema_decay
        self.usage[...] = decay * self.usage[...] + (1.0 - decay) * counts


def shares(usage) -> np.ndarray:
    """[T, E] usage -> each task's share of choices per expert in percent (rows sum to 100;
    a row with no choices is all 0)."""
    usage = np.asarray(usage, np.float64)
    totals = usage.sum(axis=-1, keepdims=True)
    return np.where(totals > 0, 100.0 * usage / np.where(totals > 0, totals, 1.0), 0.0)


def effective_experts(usage: jax.Array) -> jax.Array:
    """[T, E] usage -> [T] exp(entropy of each task's usage distribution): 1 when a task
    uses one expert, E when it spreads evenly over all; 0 for a task never routed."""
    usage = jnp.asarray(usage, jnp.float32)
    totals = usage.sum(axis=-1, keepdims=True)
    p = usage / jnp.where(totals > 0, totals, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.where(totals[:, 0] > 0, jnp.exp(entropy), 0.0)
