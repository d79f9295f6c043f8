"""Argument checks shared by the MoE and MoA layers: one clear ValueError per bad value.

Shapes: B batch, L sequence length, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from multitask_moe.errors import check_int
from multitask_moe.moe.routing import ROUTING_KINDS


def positive_int(name: str, value) -> None:
    check_int(value, name, 1)


def positive_ints(**values) -> None:
    """positive_int for each name=value, in order."""
    for name, value in values.items():
        positive_int(name, value)


def top_k(value, num_experts: int) -> None:
    # Worded by hand: the bound is the layer's num_experts, which the message names.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
        raise ValueError(f"top_k={value!r} must be an int in [1, num_experts={num_experts}]")


def num_tasks(value, routing: str) -> None:
    """num_tasks: a positive int, or None where the routing has no per-task state."""
    if value is None and ROUTING_KINDS[routing].needs_tasks:
        agnostic = [name for name, kind in ROUTING_KINDS.items() if not kind.needs_tasks]
        raise ValueError(
            f"routing={routing!r} needs num_tasks >= 1, got num_tasks=None; task-agnostic "
            f"routings: {agnostic}"
        )
    if value is not None:
        positive_int("num_tasks", value)


def input_shape(x: jax.Array, d_model: int) -> tuple[int, int]:
    """x [B, L, D] -> (B, L)."""
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"x must have shape [batch, length, d_model={d_model}], got {list(x.shape)}"
        )
    return x.shape[0], x.shape[1]


def mask(value, batch: int, length: int) -> jax.Array | None:
    """mask [B, L] bool (True = real token) or None; ValueError naming the shape otherwise."""
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.shape != (batch, length) or value.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be a bool array of shape [batch, length]=({batch}, {length}), "
            f"got {value.dtype}{list(value.shape)}"
        )
    return value


def task_ids(
    value, batch: int, num_tasks: int | None, routing: str, needs_tasks: bool
) -> jax.Array | None:
    """task_ids [B] -> [B] int32, or None when the layer has no use for them.

    The range is checked where the values are concrete and on this host. Under jit it
    cannot be; an out-of-range id then reads NaN router logits (routing.take_task_rows),
    which surfaces as a NaN loss rather than a silent misroute.
    """
    if value is None:
        if needs_tasks:
            raise ValueError(f"routing={routing!r} needs task_ids [batch] at call time, got None")
        return None
    if num_tasks is None:
        # Task ids only feed the usage statistics; without num_tasks there is no table size.
        return None
    value = jnp.asarray(value)
    if value.shape != (batch,) or not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(
            f"task_ids must be an int array of shape [batch]=({batch},), got "
            f"{value.dtype}{list(value.shape)}"
        )
    if not isinstance(value, jax.core.Tracer) and value.is_fully_addressable:
        values = np.asarray(value)
        bad = values[(values < 0) | (values >= num_tasks)]
        if bad.size:
            raise ValueError(
                f"task_ids contain {sorted(set(bad.tolist()))}; allowed: 0 <= "
                f"task_id < num_tasks={num_tasks}"
            )
    return value.astype(jnp.int32)


def capacity_factor(name: str, value) -> None:
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{name}={value!r} must be > 0, or None for dropless")


def kept_experts(value, num_experts: int, top_k: int) -> tuple[int, ...] | None:
    """kept_experts: None (all), or distinct router columns in [0, num_experts), at least
    top_k of them, in increasing order -> a tuple (static: part of the layer's graph)."""
    if value is None:
        return None
    kept = tuple(int(e) for e in value)
    if (
        any(isinstance(e, bool) for e in value)
        or list(kept) != sorted(set(kept))
        or not all(0 <= e < num_experts for e in kept)
        or len(kept) < top_k
    ):
        raise ValueError(
            f"kept_experts={list(value)!r} must be at least top_k={top_k} distinct increasing "
            f"ints in [0, num_experts={num_experts})"
        )
    return kept
