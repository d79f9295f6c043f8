"""The sparse mixture-of-experts MLP layer (contract: ARCHITECTURE.md, "MoE layer").

    layer = MoE(d_model=64, d_hidden=256, num_experts=8, top_k=2, routing="tokens",
                capacity_factor=1.25, num_tasks=None, rngs=nnx.Rngs(0))
    y, aux = layer(x, task_ids=None)     # x [B, L, D], task_ids [B] int32
    y, aux = layer(x, task_ids, mask=mask)  # mask [B, L] bool: False = padding

Pipeline: router logits (routing.py) -> plan (plan.py) -> dispatch -> experts -> combine
(dispatch.py, experts.py) -> aux (losses.py). Shape legend: B batch, L sequence length,
N = B * L tokens, G groups of S tokens, E experts, K top_k, C capacity, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multitask_moe.moe import dispatch as dispatch_lib
from multitask_moe.moe import losses, plan
from multitask_moe.moe.experts import Experts
from multitask_moe.moe.routing import ROUTING_KINDS, Router, routing_kind

SAME_AS_TRAIN = "same"


class MoE(nnx.Module):
    """Sparse MoE MLP with token, expert-choice or task-aware routing.

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
        activation: str = "gelu",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ):
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_hidden", d_hidden)
        _check_positive_int("num_experts", num_experts)
        kind = routing_kind(routing)
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} must be an int in [1, num_experts={num_experts}]")
        if eval_capacity_factor == SAME_AS_TRAIN:
            eval_capacity_factor = capacity_factor
        _check_capacity_factor("capacity_factor", capacity_factor)
        _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        if kind.needs_tasks and (num_tasks is None or num_tasks < 1):
            raise ValueError(
                f"routing={routing!r} needs num_tasks >= 1, got num_tasks={num_tasks!r}; "
                "task-agnostic routings: "
                f"{[k for k, v in ROUTING_KINDS.items() if not v.needs_tasks]}"
            )
        if num_tasks is not None:
            _check_positive_int("num_tasks", num_tasks)
        if group_size is not None:
            _check_positive_int("group_size", group_size)
        _check_positive_int("dropless_block_size", dropless_block_size)
        if dispatch not in dispatch_lib.DISPATCH_KINDS:
            raise ValueError(
                f"dispatch={dispatch!r} is not allowed; allowed: {dispatch_lib.DISPATCH_KINDS}"
            )
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0")

        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.routing, self.kind, self.num_tasks = routing, kind, num_tasks
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.renormalize_gates, self.batch_priority = renormalize_gates, batch_priority
        self.group_size, self.dispatch = group_size, dispatch
        self.dropless_block_size = dropless_block_size
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
        self.experts = Experts(
            num_experts,
            d_model,
            d_hidden,
            activation=activation,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
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
        from multitask_moe.parallel import expert_parallel  # lazy: it imports this package

        batch, length = _check_input(x, self.d_model)
        mask = check_mask(mask, batch, length)
        if expert_parallel.active_mesh() is not None:
            return expert_parallel.moe_forward(self, x, task_ids, mask, deterministic)
        token_tasks = self._token_tasks(task_ids, batch, length)  # [N] or None
        num_tokens = batch * length
        group_size = self.routing_group_size(batch, length)
        groups = x.reshape(num_tokens // group_size, group_size, self.d_model)  # [G, S, D]
        group_tasks = None if token_tasks is None else token_tasks.reshape(groups.shape[:2])
        valid = None if mask is None else mask.reshape(groups.shape[:2])  # [G, S]

        logits = self.router(groups, group_tasks, deterministic=deterministic)  # [G, S, E] f32
        probs = jax.nn.softmax(logits, axis=-1)
        routing_plan = self.make_plan(probs, deterministic, valid)
        y = self.move_tokens(groups.astype(self.dtype), routing_plan)  # [G, S, D]

        stats = self.routing_stats(logits, probs, routing_plan, token_tasks, mask)
        aux = losses.aux_from_stats(stats, choice=self.kind.choice)
        y = self.add_shared_experts(y.reshape(batch, length, self.d_model), x, mask)
        return y.astype(self.dtype), aux

    def capacity(self, group_size: int, deterministic: bool) -> int | None:
        """Slots per expert per group; None when dropless token choice."""
        factor = self.eval_capacity_factor if deterministic else self.capacity_factor
        if factor is None:
            # Expert choice has no drops to avoid: without a factor every expert sees every
            # token (C = S), the exact dense-gated limit.
            return group_size if self.kind.choice == "experts" else None
        return plan.capacity(factor, group_size, self.top_k, self.num_experts)

    def make_plan(
        self, probs: jax.Array, deterministic: bool, valid: jax.Array | None = None
    ) -> plan.Plan:
        """probs [G, S, E] float32, valid [G, S] bool or None -> Plan (see plan.py)."""
        capacity = self.capacity(probs.shape[1], deterministic)
        if self.kind.choice == "experts":
            return plan.expert_choice(probs, capacity, valid)
        if capacity is None and self.dispatch == "index":
            return plan.dropless_token_choice(
                probs,
                self.top_k,
                self.dropless_block_size,
                renormalize=self.renormalize_gates,
                valid=valid,
            )
        if capacity is None:
            # One-hot dispatch cannot be ragged: the exact dropless bound is C = S.
            capacity = probs.shape[1]
        return plan.token_choice(
            probs,
            self.top_k,
            capacity,
            batch_priority=self.batch_priority,
            renormalize=self.renormalize_gates,
            valid=valid,
        )

    def move_tokens(
        self,
        groups: jax.Array,
        routing_plan: plan.Plan,
        exchange: Callable[..., jax.Array] | None = None,
    ) -> jax.Array:
        """groups [G, S, D] -> routed output [G, S, D]: dispatch, experts, combine.

        exchange(slots, back=...): under expert parallelism, the all-to-all that carries the
        [G, E, C, D] slots to the devices holding their experts and back (capacity layout);
        the only step that differs from one device.
        """
        if routing_plan.block_size:  # dropless layout: all tokens in one sorted group
            tokens = groups.reshape(1, -1, self.d_model)  # [1, N, D]
            rows = dispatch_lib.dispatch(tokens, routing_plan, "index")[0]  # [R, D]
            out = self.experts.grouped(
                rows, routing_plan.block_bounds * routing_plan.block_size, routing_plan.block_size
            )
            return dispatch_lib.combine(out[None], routing_plan, "index").reshape(groups.shape)
        num_groups = groups.shape[0]
        rows = dispatch_lib.dispatch(groups, routing_plan, self.dispatch)  # [G, E * C, D]
        slots = rows.reshape(num_groups, self.num_experts, routing_plan.capacity, self.d_model)
        if exchange is not None:
            slots = exchange(slots, back=False)  # [n * G, E_loc, C, D]: this device's experts
        # The one-hot path keeps the batched-einsum experts: together they are the GShard form.
        run_experts = self.experts if self.dispatch == "index" else self.experts.batched
        out = run_experts(slots)
        if exchange is not None:
            out = exchange(out, back=True)  # [G, E, C, D]
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
        return y + self.shared_experts.dense(x) * _token_weight(mask, x.dtype)

    def routing_group_size(self, batch: int, length: int) -> int:
        """Tokens per routing group: group_size, or one sequence when None.

        A sequence never straddles devices (batches are split by example), so with the default
        capacity is counted the same way on one device and on any mesh.
        """
        if self.group_size is None:
            return length
        if (batch * length) % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must divide the number of tokens batch * length = "
                f"{batch * length}"
            )
        return self.group_size

    def _token_tasks(self, task_ids, batch: int, length: int) -> jax.Array | None:
        return token_task_ids(
            task_ids, batch, length, self.num_tasks, self.routing, self.kind.needs_tasks
        )


def token_task_ids(
    task_ids, batch: int, length: int, num_tasks: int | None, routing: str, needs_tasks: bool
) -> jax.Array | None:
    """task_ids [B] -> per-token ids [B * L], validated where the values are concrete.

    Under jit the range cannot be checked; an out-of-range id then reads NaN router logits
    (routing.take_task_rows), which surfaces as a NaN loss rather than a silent misroute.
    """
    if task_ids is None:
        if needs_tasks:
            raise ValueError(f"routing={routing!r} needs task_ids [batch] at call time, got None")
        return None
    if num_tasks is None:
        # Task ids only feed the usage statistics; without num_tasks there is no table size.
        return None
    task_ids = jnp.asarray(task_ids)
    if task_ids.shape != (batch,) or not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise ValueError(
            f"task_ids must be an int array of shape [batch]=({batch},), got "
            f"{task_ids.dtype}{list(task_ids.shape)}"
        )
    if not isinstance(task_ids, jax.core.Tracer):
        values = np.asarray(task_ids)
        bad = values[(values < 0) | (values >= num_tasks)]
        if bad.size:
            raise ValueError(
                f"task_ids contain {sorted(set(bad.tolist()))}; allowed: 0 <= "
                f"task_id < num_tasks={num_tasks}"
            )
    return jnp.repeat(task_ids.astype(jnp.int32), length)


def check_mask(mask, batch: int, length: int) -> jax.Array | None:
    """mask [B, L] bool (True = real token) or None; ValueError naming the shape otherwise."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != (batch, length) or mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be a bool array of shape [batch, length]=({batch}, {length}), "
            f"got {mask.dtype}{list(mask.shape)}"
        )
    return mask


def _token_weight(mask: jax.Array | None, dtype) -> jax.Array | float:
    """mask [B, L] -> [B, L, 1] 0/1 in dtype (1.0 without a mask)."""
    return 1.0 if mask is None else mask[..., None].astype(dtype)


def _check_input(x: jax.Array, d_model: int) -> tuple[int, int]:
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"x must have shape [batch, length, d_model={d_model}], got {list(x.shape)}"
        )
    return x.shape[0], x.shape[1]


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def _check_capacity_factor(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name}={value!r} must be > 0, or None for dropless")
