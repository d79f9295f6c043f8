"""Experts: E two-layer MLPs stored as one stacked weight pair, run as batched matmuls.

Shapes: E experts, D d_model, H d_hidden, G groups, C capacity, B rows per block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from multitask_moe.moe.grouped import grouped_mlp
from multitask_moe.parallel.sharding import expert_param

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not allowed; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _replicated_param(init, *args) -> nnx.Param:
    return nnx.Param(init(*args))


# Default: hidden activations up to this size (a typical L2 cache) run as one batched einsum.
BATCHED_HIDDEN_BYTES = 2 << 20


class Experts(nnx.Module):
    """w_in [E, D, H], w_out [E, H, D]; expert e computes act(x @ w_in[e]) @ w_out[e]."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "gelu",
        max_batched_hidden_bytes: int = BATCHED_HIDDEN_BYTES,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        sharded: bool = True,
        replicate_indivisible: bool = False,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.act = activation_fn(activation)
        self.dtype = dtype
        self.max_batched_hidden_bytes = max_batched_hidden_bytes
        # Per-expert fan-in init, as for E separate Dense layers.
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        # Routed experts are sharded over the mesh's 'expert' axis from creation when built
        # under jax.set_mesh; shared experts (sharded=False) serve every token: replicated.
        # replicate_indivisible: replicated where E does not divide the 'expert' axis.
        make = (
            functools.partial(expert_param, replicate_indivisible=replicate_indivisible)
            if sharded
            else _replicated_param
        )
        self.w_in = make(init, rngs.params(), (num_experts, d_model, d_hidden), param_dtype)
        self.w_out = make(init, rngs.params(), (num_experts, d_hidden, d_model), param_dtype)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def __call__(self, slots: jax.Array, *, tile: int = 256) -> jax.Array:
        """slots [G, E, C, D] -> [G, E, C, D]: expert e on its own C slots of every group.

        Tiling pays when the hidden activations of all slots would not stay in cache; below
        `max_batched_hidden_bytes` of them (a constructor argument)
        one batched einsum has no loop overhead and wins.
        Above it, a tiled grouped matmul over expert-major rows (grouped.py), with the tile
        shrunk so that equal tiles cover each expert's run (no recomputed rows).
        """
        num_groups, num_experts, capacity, d_model = slots.shape
        hidden_bytes = (
            num_groups
            * num_experts
            * capacity
            * self.w_in.shape[-1]
            * jnp.dtype(self.dtype).itemsize
        )
        # A symbolic batch size (jax.export) takes the einsum: tiles need static sizes.
        if not isinstance(hidden_bytes, int) or hidden_bytes <= self.max_batched_hidden_bytes:
            return self.batched(slots)
        rows = slots.transpose(1, 0, 2, 3).reshape(-1, d_model)  # [E * G * C, D] expert-major
        run = num_groups * capacity
        num_tiles = -(-run // tile)
        row_bounds = jnp.arange(num_experts + 1, dtype=jnp.int32) * run
        out = self.grouped(rows, row_bounds, -(-run // num_tiles))
        return out.reshape(num_experts, num_groups, capacity, d_model).transpose(1, 0, 2, 3)

    def batched(self, slots: jax.Array) -> jax.Array:
        """Same as __call__ as one batched einsum per matmul (the GShard / V-MoE form)."""
        w_in, w_out = self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype)
        hidden = self.act(jnp.einsum("gecd,edh->gech", slots.astype(self.dtype), w_in))
        return jnp.einsum("gech,ehd->gecd", hidden, w_out)

    def grouped(self, rows: jax.Array, row_bounds: jax.Array, tile: int) -> jax.Array:
        """rows [R, D] sorted by expert, expert e in [row_bounds[e], row_bounds[e + 1])."""
        return grouped_mlp(
            self.act,
            tile,
            rows.astype(self.dtype),
            self.w_in[...].astype(self.dtype),
            self.w_out[...].astype(self.dtype),
            row_bounds,
        )

    def dense(self, x: jax.Array) -> jax.Array:
        """Every token through every expert, summed: x [..., D] -> [..., D] (shared experts)."""
        w_in, w_out = self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype)
        hidden = self.act(jnp.einsum("...d,edh->...eh", x.astype(self.dtype), w_in))
        return jnp.einsum("...eh,ehd->...d", hidden, w_out)
