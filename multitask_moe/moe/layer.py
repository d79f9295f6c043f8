"""The sparse mixture-of-experts MLP layer (contract: docs/layers.md).

    layer = MoE(d_model=64, d_hidden=256, num_experts=8, top_k=2, routing="tokens",
                capacity_factor=1.25, num_tasks=None, rngs=nnx.Rngs(0))
    y, aux = layer(x, task_ids=None)     # x [B, L, D], task_ids [B] int32
    y, aux = layer(x, task_ids, mask=mask)  # mask [B, L] bool: False = padding

Pipeline: router logits (routing.py) -> plan (plan.py) -> dispatch -> experts -> combine
(dispatch.py, experts.py) -> aux (losses.py). One forward (`MoE.forward`) serves one device
and a mesh: under jax.set_mesh it runs inside shard_map (parallel.expert_parallel) with an
exchange that carries the expert slots across devices. Shape legend: B batch, L sequence
length, N = B * L tokens, G groups of S tokens, E experts, K top_k, C capacity, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from multitask_moe.moe import checks, losses, plan, sharded_dropless
from multitask_moe.moe import dispatch as dispatch_lib
from multitask_moe.moe.experts import BATCHED_HIDDEN_BYTES, Experts
from multitask_moe.moe.routing import (
    ActiveExperts,
    Router,
    held_columns,
    mask_inactive,
    routing_kind,
)
from multitask_moe.moe.settings import settings_class
from multitask_moe.moe.usage import TracksUsage, check_decay, usage_table
from multitask_moe.parallel import exchange as exchange_lib
from multitask_moe.parallel import expert_parallel
from multitask_moe.parallel.exchange import LOCAL, Exchange

SAME_AS_TRAIN = "same"
# Per-expert parameters, by their path in the layer: sharded over 'expert' on a mesh.
EXPERT_PARAMS = frozenset({("experts", "w_in"), ("experts", "w_out")})


class MoE(nnx.Module, TracksUsage):
    """Sparse MoE MLP with token, expert-choice or task-aware routing.

    Args of the contract (docs/layers.md):
      d_hidden: hidden width of every expert's MLP.
      num_experts, top_k: experts, and how many each token uses (under expert choice,
        how many on average: each expert takes top_k * tokens / num_experts of them).
      routing: "tokens", "experts", "task", "task_tokens" or "per_task" (routing.py).
      capacity_factor: slots per expert as a multiple of an even share of a routing
        group's assignments; None = dropless (every choice is computed).

    Args beyond the contract:
      eval_capacity_factor: capacity when deterministic (eval); "same" = capacity_factor,
        None = dropless. Evaluation usually wants more slots than training.
      num_shared_experts: experts every token goes through, added to the routed output.
      renormalize_gates: make the K gates of a token sum to 1 (off: Switch, V-MoE, Mod-Squad).
      router_noise: std of Gaussian noise on the logits in training (rng stream "router").
      router_init: "normal" or "zeros" (Mod-Squad zero-initializes its routers).
      batch_priority: capacity goes to the tokens with the highest top gate first.
      group_size: tokens per routing group (capacity is per group); None = one group per
        sequence, which never straddles devices, so capacity drops are the same on any mesh.
      dispatch: "index" (gathers, default) or "einsum" (one-hot tensors, GShard style).
      dropless_block_size: rows per block of the dropless grouped matmul.
      max_batched_hidden_bytes: expert hidden activations up to this size run as one
        batched einsum, larger ones as a tiled grouped matmul (experts.py).
      activation: the experts' nonlinearity ("gelu", "relu", "silu").
      usage_ema_decay: decay of the per-task usage EMA `usage` [T, E] (usage.py), which
        the train step updates through `record_usage`.
      kept_experts: the router columns whose experts this layer holds (None = all
        num_experts). An extracted model that keeps a task's full router uses it: the
        softmax runs over all num_experts logits and top-k picks among the kept columns.
      exchange: how dropless token choice reaches the experts of other devices: "ring"
        (all-gather, local experts, reduce-scatter), "ragged" (ragged all-to-all, GPU and
        TPU only), "all_to_all" (C = S slots, E / K times the routed rows) or "auto" (ragged
        on GPU/TPU, ring on CPU). Capacity routing, expert choice and one-hot dispatch
        always use the all-to-all of slots (parallel/exchange.py).
      replicate_indivisible_experts: on a mesh whose 'expert' axis does not divide the
        held expert count, replicate the experts instead of raising.
      expert_mask: the layer holds `active_experts` [router_width] bool (state, all True
        at the start); a column set False is never chosen (its logit is masked before
        the softmax), so experts can be switched on and off without changing any shape:
        an evolving system keeps free expert slots this way (evolution/path_model.py).
        Token choice only. The load-balancing loss and the capacity still count every
        column: with k of E active, the balance loss's floor is E / k instead of 1.
      deterministic: default mode; nnx's model.eval() / model.train() flip it.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int,
        routing: str = "tokens",
        capacity_factor: float | None = 1.25,
        num_tasks: int | None = None,
        *,
        eval_capacity_factor: float | None | str = SAME_AS_TRAIN,
        num_shared_experts: int = 0,
        renormalize_gates: bool = False,
        router_noise: float = 0.0,
        router_init: str = "normal",
        batch_priority: bool = False,
        group_size: int | None = None,
        dispatch: str = "index",
        dropless_block_size: int = 256,
        max_batched_hidden_bytes: int = BATCHED_HIDDEN_BYTES,
        activation: str = "gelu",
        usage_ema_decay: float = 0.95,
        kept_experts: tuple[int, ...] | None = None,
        exchange: str = "auto",
        replicate_indivisible_experts: bool = False,
        expert_mask: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ):
        checks.positive_ints(
            d_model=d_model,
            d_hidden=d_hidden,
            num_experts=num_experts,
            dropless_block_size=dropless_block_size,
        )
        kind = routing_kind(routing)
        checks.top_k(top_k, num_experts)
        if eval_capacity_factor == SAME_AS_TRAIN:
            eval_capacity_factor = capacity_factor
        checks.capacity_factor("capacity_factor", capacity_factor)
        checks.capacity_factor("eval_capacity_factor", eval_capacity_factor)
        checks.num_tasks(num_tasks, routing)
        if group_size is not None:
            checks.positive_int("group_size", group_size)
        if dispatch not in dispatch_lib.DISPATCH_KINDS:
            raise ValueError(
                f"dispatch={dispatch!r} is not allowed; allowed: {dispatch_lib.DISPATCH_KINDS}"
            )
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int):
            raise ValueError(f"num_shared_experts={num_shared_experts!r} must be an int >= 0")
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0")
        if max_batched_hidden_bytes < 0:
            raise ValueError(f"max_batched_hidden_bytes={max_batched_hidden_bytes} must be >= 0")
        check_decay(usage_ema_decay)
        exchange_lib.check_exchange(exchange)
        kept_experts = checks.kept_experts(kept_experts, num_experts, top_k)
        if expert_mask and kind.choice == "experts":
            raise ValueError(
                f"expert_mask=True needs token choice; routing={routing!r} lets the experts "
                "choose, so a switched-off expert would still take tokens"
            )

        # num_experts: the experts held here; the router has router_width outputs.
        self.kept_experts = kept_experts
        self.router_width = num_experts
        num_experts = num_experts if kept_experts is None else len(kept_experts)
        self.replicate_indivisible_experts = replicate_indivisible_experts
        self.exchange = exchange
        self.usage_ema_decay = usage_ema_decay
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.routing, self.kind, self.num_tasks = routing, kind, num_tasks
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.renormalize_gates, self.batch_priority = renormalize_gates, batch_priority
        self.group_size, self.dispatch = group_size, dispatch
        self.dropless_block_size = dropless_block_size
        self.dtype, self.deterministic = dtype, deterministic
        if exchange in exchange_lib.SORTED_EXCHANGES and not (
            self.sorted_dropless(False) or self.sorted_dropless(True)
        ):
            raise ValueError(
                f"exchange={exchange!r} carries dropless token choice with index dispatch; "
                f"this layer has routing={routing!r}, capacity_factor={capacity_factor}, "
                f"eval_capacity_factor={eval_capacity_factor}, dispatch={dispatch!r} "
                "(use 'auto' or 'all_to_all')"
            )
        self.router = Router(
            d_model,
            self.router_width,
            routing,
            num_tasks=num_tasks,
            init=router_init,
            noise_std=router_noise,
            rngs=rngs,
        )
        self.experts = Experts(
            num_experts,
            d_model,
            d_hidden,
            activation=activation,
            max_batched_hidden_bytes=max_batched_hidden_bytes,
            dtype=dtype,
            param_dtype=param_dtype,
            replicate_indivisible=replicate_indivisible_experts,
            rngs=rngs,
        )
        self.usage = usage_table(num_tasks, num_experts)
        self.active_experts = (
            ActiveExperts(jnp.ones((self.router_width,), bool)) if expert_mask else nnx.data(None)
        )
        self.shared_experts = (
            Experts(
                num_shared_experts,
                d_model,
                d_hidden,
                activation=activation,
                dtype=dtype,
                param_dtype=param_dtype,
                sharded=False,
                rngs=rngs,
            )
            if num_shared_experts
            else nnx.data(None)
        )

    def __call__(
        self,
        x: jax.Array,
        task_ids: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, L, D], task_ids [B] int32, mask [B, L] bool -> (y [B, L, D], aux).

        Tokens where mask is False (padding) are not routed: they take no capacity, their
        output is 0 (shared experts included), and they enter no aux loss or metric.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        batch, length = checks.input_shape(x, self.d_model)
        inputs = {
            "x": x,
            "task_ids": checks.task_ids(
                task_ids, batch, self.num_tasks, self.routing, self.kind.needs_tasks
            ),
            "mask": checks.mask(mask, batch, length),
            "noise": self.router.noise((batch, length), deterministic),
        }
        return expert_parallel.run(
            self,
            lambda layer, inputs, exchange: layer.forward(inputs, exchange, deterministic),
            EXPERT_PARAMS,
            inputs,
            exchange=exchange_lib.resolve(
                self.exchange, dropless_token_choice=self.sorted_dropless(deterministic)
            ),
            replicate_indivisible=self.replicate_indivisible_experts,
        )

    def forward(
        self, inputs: dict[str, jax.Array], exchange: Exchange, deterministic: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layer on one device's tokens: inputs x [B, L, D] and, when given, task_ids
        [B], mask [B, L], noise [B, L, E]; `exchange` carries the expert slots to the
        devices holding the experts (nothing to do on one device)."""
        x = inputs["x"]
        batch, length, _ = x.shape
        group_size = self.routing_group_size(batch * length, length)
        groups = x.reshape(-1, group_size, self.d_model)  # [G, S, D]
        token_tasks = None if "task_ids" not in inputs else jnp.repeat(inputs["task_ids"], length)
        group_tasks = None if token_tasks is None else token_tasks.reshape(groups.shape[:2])
        valid = inputs["mask"].reshape(groups.shape[:2]) if "mask" in inputs else None  # [G, S]
        noise = inputs["noise"].reshape(*groups.shape[:2], -1) if "noise" in inputs else None

        logits, probs = self.route(groups, group_tasks, noise)  # [G, S, E] f32 each
        routing_plan = self.make_plan(probs, deterministic, valid, exchange=exchange)
        rerouting = None
        ring = exchange.moves_rows and exchange.kind == "ring"
        if ring and noise is None and x.dtype == self.dtype:  # it sees what the router saw
            rerouting = sharded_dropless.Rerouting(
                self.choose_experts,
                inputs.get("task_ids") if self.kind.needs_tasks else None,
                None if valid is None else valid.reshape(-1),
            )
        y = self.move_tokens(groups.astype(self.dtype), routing_plan, exchange, rerouting)

        stats = self.routing_stats(logits, probs, routing_plan, token_tasks, valid)
        aux = losses.aux_from_stats(exchange.total(stats), choice=self.kind.choice)
        y = self.add_shared_experts(y.reshape(x.shape), x, inputs.get("mask"))
        return y.astype(self.dtype), aux

    def make_plan(
        self,
        probs: jax.Array,
        deterministic: bool,
        valid: jax.Array | None = None,
        *,
        exchange: Exchange = LOCAL,
    ) -> plan.Plan:
        """probs [G, S, E] float32, valid [G, S] bool or None -> Plan (see plan.py).

        The one place the capacity factor is read. exchange: the token movement; the
        dropless sorted-rows layout needs one that can carry it (not an all-to-all of
        static slots). Rows that cross devices are sorted without block padding: the
        devices holding the experts lay out their runs themselves.
        """
        factor = self.eval_capacity_factor if deterministic else self.capacity_factor
        if self.sorted_dropless(deterministic) and exchange.sorted_rows:
            return plan.dropless_token_choice(
                probs,
                self.top_k,
                1 if exchange.moves_rows else self.dropless_block_size,
                renormalize=self.renormalize_gates,
                valid=valid,
            )
        # Without a factor, C = S slots: a token picks each expert at most once, so token
        # choice never overflows (dropless in fixed-size slots: one-hot dispatch, or an
        # all-to-all), and for expert choice every expert sees every token, the exact
        # dense-gated limit.
        group_size = probs.shape[1]
        capacity = (
            group_size
            if factor is None
            else plan.capacity(factor, group_size, self.top_k, self.num_experts)
        )
        if self.kind.choice == "experts":
            return plan.expert_choice(probs, capacity, valid)
        return plan.token_choice(
            probs,
            self.top_k,
            capacity,
            batch_priority=self.batch_priority,
            renormalize=self.renormalize_gates,
            valid=valid,
        )

    def route(
        self, groups: jax.Array, tasks: jax.Array | None, noise: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """groups [G, S, D], tasks [G, S] or None, noise [G, S, router_width] or None ->
        (logits, probs) [G, S, E] float32: the softmax over every router column, then the
        columns of the experts held here."""
        logits = self.router(groups, tasks, noise=noise)  # [G, S, router_width]
        active = None if self.active_experts is None else self.active_experts[...]
        logits = mask_inactive(logits, active)
        return held_columns(self.kept_experts, logits, jax.nn.softmax(logits, axis=-1))

    def choose_experts(
        self, tokens: jax.Array, token_tasks: jax.Array | None, valid: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Dropless token choice without router noise, as `forward` routes: tokens [M, D],
        token_tasks [M] or None, valid [M] or None -> (experts [M, K] int32, E where a
        token is padding; gates [M, K] float32)."""
        tasks = None if token_tasks is None else token_tasks[None]
        _, probs = self.route(tokens[None], tasks)  # [1, M, E]
        experts, gates = plan.top_k_choices(
            probs,
            self.top_k,
            renormalize=self.renormalize_gates,
            valid=None if valid is None else valid[None],
        )  # [1, K, M] each
        return experts[0].T, gates[0].T

    def sorted_dropless(self, deterministic: bool) -> bool:
        """Whether this mode routes dropless token choice in sorted rows (index dispatch)."""
        factor = self.eval_capacity_factor if deterministic else self.capacity_factor
        return factor is None and self.dispatch == "index" and self.kind.choice == "tokens"

    def move_tokens(
        self,
        groups: jax.Array,
        routing_plan: plan.Plan,
        exchange: Exchange = LOCAL,
        rerouting: sharded_dropless.Rerouting | None = None,
    ) -> jax.Array:
        """groups [G, S, D] -> routed output [G, S, D]: dispatch, experts, combine, in the
        plan's layout. exchange: carries the slots (all-to-all) or the sorted rows (ring,
        ragged) to the devices holding their experts and back. rerouting: lets the ring
        route the gathered tokens instead of gathering the plan's choices."""
        if routing_plan.sorted_blocks and exchange.moves_rows:
            tokens = groups.reshape(-1, self.d_model)  # [N, D]
            tile = self.dropless_block_size
            if exchange.kind == "ring":
                out = sharded_dropless.ring(
                    self.experts, tokens, routing_plan, exchange, tile, rerouting
                )
            else:
                out = sharded_dropless.ragged(self.experts, tokens, routing_plan, exchange, tile)
            return out.reshape(groups.shape)
        if routing_plan.sorted_blocks:  # all tokens in one group, rows sorted by expert
            tokens = groups.reshape(1, -1, self.d_model)  # [1, N, D]
            rows = dispatch_lib.dispatch(tokens, routing_plan, "index")[0]  # [R, D]
            out = self.experts.grouped(
                rows, routing_plan.block_bounds * routing_plan.block_size, routing_plan.block_size
            )
            return dispatch_lib.combine(out[None], routing_plan, "index").reshape(groups.shape)
        num_groups = groups.shape[0]
        rows = dispatch_lib.dispatch(groups, routing_plan, self.dispatch)  # [G, E * C, D]
        slots = rows.reshape(num_groups, self.num_experts, routing_plan.capacity, self.d_model)
        slots = exchange.to_experts(slots)  # [n * G, E_loc, C, D]: this device's experts
        # The one-hot path keeps the batched-einsum experts: together they are the GShard form.
        run_experts = self.experts if self.dispatch == "index" else self.experts.batched
        out = exchange.from_experts(run_experts(slots))  # [G, E, C, D]
        return dispatch_lib.combine(out.reshape(rows.shape), routing_plan, self.dispatch)

    def routing_stats(
        self,
        logits: jax.Array,
        probs: jax.Array,
        routing_plan: plan.Plan,
        token_tasks: jax.Array | None,
        mask: jax.Array | None,
    ) -> dict:
        """Summable statistics (losses.router_stats) of these tokens: logits, probs [G, S, E],
        token_tasks [N] or None, mask of any shape with N elements or None."""
        flat = lambda a: a.reshape(-1, a.shape[-1])  # [N, E]
        return losses.router_stats(
            flat(logits),
            flat(probs),
            flat(routing_plan.kept),
            flat(routing_plan.chosen),
            token_tasks,
            self.num_tasks,
            None if mask is None else mask.reshape(-1),
        )

    def add_shared_experts(self, y: jax.Array, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """y + the shared experts' output on x [B, L, D] (0 at padding); y if there are none."""
        if self.shared_experts is None:
            return y
        weight = 1.0 if mask is None else mask[..., None].astype(x.dtype)  # [B, L, 1]
        return y + self.shared_experts.dense(x) * weight

    def routing_group_size(self, num_tokens: int, length: int) -> int:
        """Tokens per routing group among one device's `num_tokens`: group_size, or one
        sequence of `length` when None.

        A sequence never straddles devices (batches are split by example), so with the
        default capacity is counted the same way on one device and on any mesh.
        """
        if self.group_size is None:
            return length
        if num_tokens % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the {num_tokens} tokens per "
                "device (batch x length of its share); routing groups may not straddle devices"
            )
        return self.group_size


MoESettings = settings_class(MoE)
