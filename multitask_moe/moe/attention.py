"""Mixture of attention heads (MoA, Mod-Squad; docs/methods.md).

Each attention expert e owns a query projection w_query[e] [D, H] and an output
projection w_out[e] [H, D]; one key/value projection w_kv [D, 2H] is shared by all
experts (H = head_dim). Every token picks K experts with the same routers as the MoE MLP;
for each chosen expert its query attends over the shared keys/values, and the K outputs,
projected by w_out[e], are summed with the gates. No token is dropped (Mod-Squad's MoA has
no capacity), so the routing options are those of token choice.

The projections move token rows to their experts through the same plan and slots as the
MoE layer: one routing group per sequence with C = L slots per expert (never a drop). On a mesh
the slots cross devices by the expert all-to-all (parallel.expert_parallel) twice per
projection; keys, values and attention stay with the tokens.

Shapes: B batch, L queries, M keys (= L), N = B * L tokens, E experts, K top_k, C slots
per expert, H head_dim, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from multitask_moe.moe import checks, losses, plan
from multitask_moe.moe import dispatch as dispatch_lib
from multitask_moe.moe.routing import Router, held_columns, routing_kind
from multitask_moe.moe.settings import settings_class
from multitask_moe.moe.usage import TracksUsage, check_decay, usage_table
from multitask_moe.parallel import expert_parallel
from multitask_moe.parallel.exchange import Exchange
from multitask_moe.parallel.sharding import expert_param

# Per-expert parameters, by their path in the layer: sharded over 'expert' on a mesh.
EXPERT_PARAMS = frozenset({("w_query",), ("w_out",)})


class MoA(nnx.Module, TracksUsage):
    """y, aux = MoA(...)(x [B, L, D], task_ids [B] | None, mask [B, L] | None).

    Args beyond d_model, num_tasks, dtypes and rngs:
      num_experts, top_k: attention experts, and how many each token uses.
      head_dim: H, the width of every expert's query and of the shared keys/values.
      routing: a token-choice routing kind (routing.py).
      causal: queries attend only to keys at or before their position.
      renormalize_gates: make the K gates of a token sum to 1 (off in Mod-Squad).
      router_noise: std of Gaussian noise on the logits in training (rng stream "router").
      router_init: "normal" or "zeros" (Mod-Squad zero-initializes its routers).
      usage_ema_decay, kept_experts, replicate_indivisible_experts: as for the MoE layer.
      deterministic: default mode; nnx's model.eval() / model.train() flip it.
    """

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
        usage_ema_decay: float = 0.95,
        kept_experts: tuple[int, ...] | None = None,
        replicate_indivisible_experts: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ):
        checks.positive_ints(d_model=d_model, num_experts=num_experts, head_dim=head_dim)
        kind = routing_kind(routing)
        if kind.choice != "tokens":
            raise ValueError(
                f"MoA routing={routing!r} is not allowed: attention experts are chosen "
                "by tokens; allowed: tokens, task, task_tokens, per_task"
            )
        checks.top_k(top_k, num_experts)
        checks.num_tasks(num_tasks, routing)
        check_decay(usage_ema_decay)
        kept_experts = checks.kept_experts(kept_experts, num_experts, top_k)
        # num_experts: the experts held here; the router has router_width outputs.
        self.kept_experts, self.router_width = kept_experts, num_experts
        num_experts = num_experts if kept_experts is None else len(kept_experts)
        self.replicate_indivisible_experts = replicate_indivisible_experts
        self.usage_ema_decay = usage_ema_decay
        self.d_model, self.num_experts = d_model, num_experts
        self.top_k, self.head_dim = top_k, head_dim
        self.routing, self.kind, self.num_tasks = routing, kind, num_tasks
        self.causal, self.renormalize_gates = causal, renormalize_gates
        self.dtype, self.deterministic = dtype, deterministic
        self.router = Router(
            d_model,
            self.router_width,
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
        def per_expert(shape):
            return expert_param(
                fan_in,
                rngs.params(),
                (num_experts, *shape),
                param_dtype,
                replicate_indivisible=replicate_indivisible_experts,
            )

        self.w_query = per_expert((d_model, head_dim))  # [E, D, H]
        self.w_out = per_expert((head_dim, d_model))  # [E, H, D]
        self.w_kv = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (d_model, 2 * head_dim), param_dtype)
        )
        self.usage = usage_table(num_tasks, num_experts)

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
        batch, length = checks.input_shape(x, self.d_model)
        if mask is not None:
            mask = checks.mask(jnp.asarray(mask).astype(bool), batch, length)
        inputs = {
            "x": x,
            "task_ids": checks.task_ids(
                task_ids, batch, self.num_tasks, self.routing, self.kind.needs_tasks
            ),
            "mask": mask,
            "noise": self.router.noise((batch, length), deterministic),
        }
        return expert_parallel.run(
            self,
            lambda layer, inputs, exchange: layer.forward(inputs, exchange),
            EXPERT_PARAMS,
            inputs,
            replicate_indivisible=self.replicate_indivisible_experts,
        )

    def forward(
        self, inputs: dict[str, jax.Array], exchange: Exchange
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layer on one device's tokens: inputs x [B, L, D] and, when given, task_ids
        [B], mask [B, L], noise [B, L, E]; `exchange` carries the projection slots to the
        devices holding the experts (nothing to do on one device)."""
        x = inputs["x"]
        batch, length, _ = x.shape
        token_tasks = None if "task_ids" not in inputs else jnp.repeat(inputs["task_ids"], length)
        group_tasks = None if token_tasks is None else token_tasks.reshape(batch, length)
        logits = self.router(x, group_tasks, noise=inputs.get("noise"))  # [B, L, width] f32
        probs = jax.nn.softmax(logits, axis=-1)
        logits, probs = held_columns(self.kept_experts, logits, probs)  # [B, L, E]
        # One routing group per sequence with C = L slots per expert: MoA has no capacity,
        # and no slot overflows since a token picks each expert at most once. (Per-sequence
        # groups keep the plan's position counting short; one group of all N tokens would
        # make it O(N^2) where XLA lowers the cumulative sum as a window reduction.)
        # Padding is not routed: it chooses no expert and enters no statistic (its output,
        # 0, is read by nothing: padding keys are masked and pooling skips padding).
        mask = inputs.get("mask")
        routing_plan = plan.token_choice(
            probs, self.top_k, length, renormalize=self.renormalize_gates, valid=mask
        )

        x_c = x.astype(self.dtype)
        rows = dispatch_lib.dispatch(x_c, routing_plan)  # [B, E * C, D]
        query_rows = self.project(rows, self.w_query, exchange)  # [B, E * C, H]
        queries = dispatch_lib.rows_to_choices(query_rows, routing_plan)  # [B, K, L, H]
        keys, values = jnp.split(x_c @ self.w_kv[...].astype(self.dtype), 2, axis=-1)  # [B, M, H]
        allowed = self.allowed(mask, batch, length)  # [B, L, M]
        heads = attend(
            queries.transpose(0, 2, 1, 3), keys, values, allowed, self.head_dim, self.dtype
        )  # [B, L, K, H]
        head_rows = dispatch_lib.choices_to_rows(heads.transpose(0, 2, 1, 3), routing_plan)
        out_rows = self.project(head_rows, self.w_out, exchange)  # [B, E * C, D]
        y = dispatch_lib.combine(out_rows, routing_plan)  # [B, L, D]: gated sum of choices

        flat = lambda a: a.reshape(batch * length, -1)  # [N, E]
        chosen = flat(routing_plan.chosen)
        stats = losses.router_stats(
            flat(logits),
            flat(probs),
            chosen,
            chosen,
            token_tasks,
            self.num_tasks,
            None if mask is None else mask.reshape(-1),
        )
        aux = losses.aux_from_stats(exchange.total(stats), choice="tokens")
        return y.astype(self.dtype), aux

    def project(self, rows: jax.Array, weight: nnx.Param, exchange: Exchange) -> jax.Array:
        """Slot rows [G, E * C, X] -> [G, E * C, Y]: the rows of expert e through
        weight[e] [X, Y], on the device that holds expert e."""
        num_groups, num_rows, width = rows.shape
        slots = rows.reshape(num_groups, self.num_experts, -1, width)  # [G, E, C, X]
        slots = exchange.to_experts(slots)  # [n * G, E_loc, C, X]
        # Expert-major [E_loc, n * G * C, X]: one matmul per expert with the expert as the
        # leading batch dimension, which XLA runs ~3x faster than batching over a middle one.
        per_expert = slots.transpose(1, 0, 2, 3).reshape(slots.shape[1], -1, width)
        out = jnp.einsum("enx,exy->eny", per_expert, weight[...].astype(self.dtype))
        out = out.reshape(slots.shape[1], slots.shape[0], slots.shape[2], -1)
        out = out.transpose(1, 0, 2, 3)  # [n * G, E_loc, C, Y]
        return exchange.from_experts(out).reshape(num_groups, num_rows, -1)

    def allowed(self, mask: jax.Array | None, batch: int, length: int) -> jax.Array:
        """mask [B, L] bool or None -> [B, L, M] True where query l may attend to key m."""
        allowed = jnp.ones((batch, length, length), bool)
        if mask is not None:
            allowed = allowed & mask[:, None, :]
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None]
        return allowed


def attend(
    queries: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array, head_dim: int, dtype
) -> jax.Array:
    """queries [B, L, K, H], keys/values [B, M, H], allowed [B, L, M] -> heads [B, L, K, H]."""
    scores = jnp.einsum("blkh,bmh->blkm", queries, keys) / jnp.sqrt(jnp.asarray(head_dim, dtype))
    scores = jnp.where(allowed[:, :, None, :], scores.astype(jnp.float32), -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    # A query with no allowed key (all padding) attends to nothing, not to NaN.
    weights = jnp.where(allowed.any(-1)[:, :, None, None], weights, 0.0).astype(dtype)
    return jnp.einsum("blkm,bmh->blkh", weights, values)


MoASettings = settings_class(MoA)
