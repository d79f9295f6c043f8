"""Routers: where the E logits per token come from (docs/methods.md, Task-MoE).

A routing kind is data, not a class: each kind says whether the logits get a token term
(x . W with one W shared by all tasks, or one W[t] per task) and whether they get a task
term (a learned row A[t] of a [T, E] table), and whether tokens choose experts or experts
choose tokens. Everything after the logits (top-k, capacity, dispatch) is shared.

Shapes: G routing groups, S tokens per group, D d_model, E experts, T tasks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class RoutingKind:
    token_term: str | None  # None | "shared" (x . W) | "per_task" (x . W[t])
    task_term: bool  # adds A[t]
    choice: str  # "tokens" (each token picks K experts) | "experts" (each expert picks C tokens)

    @property
    def needs_tasks(self) -> bool:
        return self.task_term or self.token_term == "per_task"


ROUTING_KINDS: dict[str, RoutingKind] = {
    "tokens": RoutingKind(token_term="shared", task_term=False, choice="tokens"),
    "experts": RoutingKind(token_term="shared", task_term=False, choice="experts"),
    "task": RoutingKind(token_term=None, task_term=True, choice="tokens"),
    "task_tokens": RoutingKind(token_term="shared", task_term=True, choice="tokens"),
    "per_task": RoutingKind(token_term="per_task", task_term=False, choice="tokens"),
}

ROUTER_INITS = ("normal", "zeros")


def routing_kind(name: str) -> RoutingKind:
    if name not in ROUTING_KINDS:
        raise ValueError(
            f"routing={name!r} is not a routing kind; allowed: {sorted(ROUTING_KINDS)}"
        )
    return ROUTING_KINDS[name]


class Router(nnx.Module):
    """Produces float32 router logits [G, S, E] from tokens and their task ids.

    Parameters (present only when the kind uses them):
      kernel: [D, E] (shared token term) or [T, D, E] (per_task).
      task_logits: [T, E] (task and task_tokens).
    The math runs in float32 whatever the activation dtype ("selective precision"): router
    decisions are discrete, and bfloat16 logits flip top-k choices between nearly tied experts.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        routing: str,
        *,
        num_tasks: int | None = None,
        init: str = "normal",
        init_scale: float = 0.02,
        noise_std: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.kind = routing_kind(routing)
        if init not in ROUTER_INITS:
            raise ValueError(f"router_init={init!r} is not allowed; allowed: {ROUTER_INITS}")
        if noise_std < 0:
            raise ValueError(f"router_noise={noise_std} must be >= 0")
        self.routing, self.init = routing, init
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.noise_std = noise_std
        make = (
            nnx.initializers.zeros
            if init == "zeros"
            else nnx.initializers.normal(stddev=init_scale)
        )
        # Axis tags (moe.tables): task rows and router columns, for growing and slicing.
        if self.kind.token_term == "shared":
            self.kernel = nnx.Param(
                make(rngs.params(), (d_model, num_experts), jnp.float32), route_axis=1
            )
        elif self.kind.token_term == "per_task":
            self.kernel = nnx.Param(
                make(rngs.params(), (num_tasks, d_model, num_experts), jnp.float32),
                task_axis=0,
                route_axis=2,
            )
        if self.kind.task_term:
            # A zero table would give every task the same experts at step 0 (exact ties in
            # top-k); a small random start breaks the ties whatever `init` says.
            self.task_logits = nnx.Param(
                nnx.initializers.normal(stddev=max(init_scale, 1e-2))(
                    rngs.params(), (num_tasks, num_experts), jnp.float32
                ),
                task_axis=0,
                route_axis=1,
            )
        self.noise_rngs = rngs["router"].fork() if noise_std > 0 else nnx.data(None)

    def noise(self, shape: tuple[int, ...], deterministic: bool) -> jax.Array | None:
        """Training noise for the logits of tokens of `shape` -> [*shape, E] f32, or None.

        Drawn by the layer for the whole batch before its tokens are split over devices,
        so every token gets the same value on one device and on any mesh.
        """
        if self.noise_std <= 0 or deterministic:
            return None
        return jax.random.normal(self.noise_rngs(), (*shape, self.num_experts), jnp.float32)

    def __call__(
        self, x: jax.Array, task_ids: jax.Array | None, *, noise: jax.Array | None = None
    ) -> jax.Array:
        """x [G, S, D], task_ids [G, S] int32 or None, noise [G, S, E] (from `noise`) or
        None -> logits [G, S, E] float32."""
        x = x.astype(jnp.float32)
        logits = jnp.zeros(x.shape[:-1] + (self.num_experts,), jnp.float32)
        if self.kind.token_term == "shared":
            logits = jnp.einsum("gsd,de->gse", x, self.kernel[...])
        elif self.kind.token_term == "per_task":
            # One [D, E] router per task. Computing every task's logits ([G, S, T, E], T*E
            # small) and picking the token's row is cheaper than gathering a [D, E] router
            # per token.
            all_logits = jnp.einsum("gsd,tde->gste", x, self.kernel[...])
            logits = take_along_tasks(all_logits, task_ids)  # [G, S, E]
        if self.kind.task_term:
            logits = logits + take_task_rows(self.task_logits[...], task_ids)  # [G, S, E]
        if noise is not None:
            logits = logits + self.noise_std * noise
        return logits


# The logit of a switched-off expert: its softmax share is exactly 0 and every router
# statistic stays finite (-inf would make 0 * log 0 in the router entropy NaN).
MASKED_LOGIT = -1e9


class ActiveExperts(nnx.Variable):
    """[E] bool: which router columns may be chosen; state, not a parameter."""


def mask_inactive(logits: jax.Array, active: jax.Array | None) -> jax.Array:
    """logits [..., E] with the columns where active [E] is False set to MASKED_LOGIT."""
    if active is None:
        return logits
    return jnp.where(active, logits, MASKED_LOGIT)


def take_task_rows(table: jax.Array, task_ids: jax.Array) -> jax.Array:
    """table [T, ...], task_ids [G, S] -> [G, S, ...].

    Out-of-range ids cannot be checked under jit; they read NaN rather than a clamped
    neighbour, so a bad id poisons the output (and a training loss) instead of silently
    routing a task through another task's experts.
    """
    return jnp.take(table, task_ids, axis=0, mode="fill", fill_value=jnp.nan)


def take_along_tasks(per_task: jax.Array, task_ids: jax.Array) -> jax.Array:
    """per_task [G, S, T, E], task_ids [G, S] -> [G, S, E]; out-of-range ids read NaN."""
    num_tasks = per_task.shape[2]
    in_range = (task_ids >= 0) & (task_ids < num_tasks)
    picked = jnp.take_along_axis(
        per_task, jnp.clip(task_ids, 0, num_tasks - 1)[:, :, None, None], axis=2
    )[:, :, 0]
    return jnp.where(in_range[..., None], picked, jnp.nan)


def held_columns(
    kept: tuple[int, ...] | None, logits: jax.Array, probs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The router columns of the held experts: logits, probs [..., router_width] -> [..., E].

    The gates stay those of the full softmax, so top-k over the kept columns reproduces
    the full layer for every token whose top-k lies inside them.
    """
    if kept is None:
        return logits, probs
    columns = jnp.asarray(kept, jnp.int32)
    return jnp.take(logits, columns, axis=-1), jnp.take(probs, columns, axis=-1)
