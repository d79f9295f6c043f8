"""Mixture of attention heads (MoA, Mod-Squad, PAPERS.md section 2).

Each attention expert e owns a query projection w_query[e] [D, H] and an output
projection w_out[e] [H, D]; one key/value projection w_kv [D, 2H] is shared by all
experts (H = head_dim). Every token picks K experts with the same routers as the MoE MLP;
for each chosen expert its query attends over the shared keys/values, and the K outputs,
projected by w_out[e], are summed with the gates. No token is dropped (Mod-Squad's MoA has
no capacity), so the routing options are those of token choice.

Shapes: B batch, L queries, M keys (= L), E experts, K top_k, H head_dim, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from multitask_moe.moe import losses
from multitask_moe.moe.layer import _check_input, _check_positive_int, token_task_ids
from multitask_moe.moe.routing import Router, routing_kind
from multitask_moe.parallel.sharding import expert_param


class MoA(nnx.Module):
    """y, aux = MoA(...)(x [B, L, D], task_ids [B] | None, mask [B, L] | None)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        head_dim: int,
        routing: str = "tokens",
        num_tasks: int | None = None,
        *,
        causal: bool = False,
        renormalize_gates: bool = False,
        router_noise: float = 0.0,
        router_init: str = "normal",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ):
        for name, value in (
            ("d_model", d_model),
            ("num_experts", num_experts),
            ("head_dim", head_dim),
        ):
            _check_positive_int(name, value)
        kind = routing_kind(routing)
        if kind.choice != "tokens":
            raise ValueError(
                f"MoA routing={routing!r} is not allowed: attention experts are chosen "
                "by tokens; allowed: tokens, task, task_tokens, per_task"
            )
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} must be an int in [1, num_experts={num_experts}]")
        if kind.needs_tasks and (num_tasks is None or num_tasks < 1):
            raise ValueError(f"routing={routing!r} needs num_tasks >= 1, got {num_tasks!r}")
        self.d_model, self.num_experts, self.top_k, self.head_dim = (
            d_model,
            num_experts,
            top_k,
            head_dim,
        )
        self.routing, self.kind, self.num_tasks = routing, kind, num_tasks
        self.causal, self.renormalize_gates = causal, renormalize_gates
        self.dtype, self.deterministic = dtype, deterministic
        self.router = Router(
            d_model,
            num_experts,
            routing,
            num_tasks=num_tasks,
            init=router_init,
            noise_std=router_noise,
            rngs=rngs,
        )
        fan_in = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        # Sharded over the mesh's 'expert' axis from creation when built under jax.set_mesh.
        self.w_query = expert_param(
            fan_in, rngs.params(), (num_experts, d_model, head_dim), param_dtype
        )
        self.w_out = expert_param(
            fan_in, rngs.params(), (num_experts, head_dim, d_model), param_dtype
        )
        self.w_kv = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (d_model, 2 * head_dim), param_dtype)
        )

    def __call__(
        self,
        x: jax.Array,
        task_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, L, D]; mask [B, L] True for real tokens (keys outside it are ignored)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        from multitask_moe.parallel import expert_parallel  # lazy: it imports this package

        if expert_parallel.active_mesh() is not None:
            return expert_parallel.moa_forward(self, x, task_ids, mask, deterministic)
        batch, length = _check_input(x, self.d_model)
        token_tasks = token_task_ids(
            task_ids, batch, length, self.num_tasks, self.routing, self.kind.needs_tasks
        )
        group_tasks = None if token_tasks is None else token_tasks.reshape(batch, length)
        logits = self.router(x, group_tasks, deterministic=deterministic)  # [B, L, E] f32
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = jax.lax.top_k(probs, self.top_k)  # [B, L, K]
        if self.renormalize_gates:
            gates = gates / jnp.sum(gates, axis=-1, keepdims=True)

        x_c = x.astype(self.dtype)
        w_query = self.w_query[...].astype(self.dtype)
        w_out = self.w_out[...].astype(self.dtype)
        keys, values = jnp.split(x_c @ self.w_kv[...].astype(self.dtype), 2, axis=-1)  # [B, M, H]
        # Every expert's query is cheap next to attention itself (D * H per expert), and
        # [B, L, E, H] is far smaller than gathering a [D, H] projection per token and choice.
        all_queries = jnp.einsum("bld,edh->bleh", x_c, w_query)
        queries = jnp.take_along_axis(all_queries, experts[..., None], axis=2)  # [B, L, K, H]
        allowed = self._allowed(mask, batch, length)  # [B, L, M]
        heads = attend(queries, keys, values, allowed, self.head_dim, self.dtype)  # [B, L, K, H]
        # Place each gated head in its expert's slot, then one output projection per expert.
        expert_one_hot = jax.nn.one_hot(experts, self.num_experts, dtype=self.dtype)  # [B,L,K,E]
        per_expert = jnp.einsum(
            "blkh,blk,blke->bleh", heads, gates.astype(self.dtype), expert_one_hot
        )
        y = jnp.einsum("bleh,ehd->bld", per_expert, w_out)

        num_tokens = batch * length
        chosen = jnp.sum(jax.nn.one_hot(experts, self.num_experts, dtype=jnp.float32), axis=2)
        stats = losses.router_stats(
            logits.reshape(num_tokens, -1),
            probs.reshape(num_tokens, -1),
            chosen.reshape(num_tokens, -1),
            chosen.reshape(num_tokens, -1),
            token_tasks,
            self.num_tasks,
        )
        return y.astype(self.dtype), losses.aux_from_stats(stats, choice="tokens")

    def _allowed(self, mask, batch: int, length: int) -> jax.Array:
        """[B, L, M] True where query l may attend to key m."""
        allowed = jnp.ones((batch, length, length), bool)
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != (batch, length):
                raise ValueError(
                    f"mask must have shape [batch, length]=({batch}, {length}), got "
                    f"{list(mask.shape)}"
                )
            allowed = allowed & mask.astype(bool)[:, None, :]
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None]
        return allowed


def attend(
    queries: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array, head_dim: int, dtype
) -> jax.Array:
    """queries [B, L, K, H], keys/values [B, M, H], allowed [B, L, M] -> heads [B, L, K, H].

    Shared with the expert-parallel MoA (multitask_moe.parallel.expert_parallel).
    """
    scores = jnp.einsum("blkh,bmh->blkm", queries, keys) / jnp.sqrt(jnp.asarray(head_dim, dtype))
    scores = jnp.where(allowed[:, :, None, :], scores.astype(jnp.float32), -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    # A query with no allowed key (all padding) attends to nothing, not to NaN.
    weights = jnp.where(allowed.any(-1)[:, :, None, None], weights, 0.0).astype(dtype)
    return jnp.einsum("blkm,bmh->blkh", weights, values)
