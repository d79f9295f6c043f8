"""Pre-LN transformer blocks whose attention and MLP are dense or sparse (MoA / MoE).

Every sub-layer has one call shape, `y, aux = layer(x, task_ids=..., mask=...,
deterministic=...)`, with aux None for the dense ones, so a block does not branch on
which kind it holds: swapping a dense MLP for an MoE is a constructor choice only.

Shape legend: B batch, L tokens, D d_model, H attention heads, T tasks, E experts.
"""

from __future__ import annotations

import jax
from flax import nnx

from multitask_moe.errors import check_int
from multitask_moe.moe import MoA, MoASettings, MoE, MoESettings


def _from_settings(layer_class, settings, d_model, num_tasks, dtype, param_dtype, rngs):
    """A sparse layer: every option from its settings, by name; the model supplies the rest."""
    return layer_class(
        d_model,
        num_tasks=num_tasks,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **settings.layer_kwargs(),
    )


class DenseMLP(nnx.Module):
    """D -> mlp_dim -> D with GELU; the dense counterpart of one MoE layer."""

    def __init__(self, d_model: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc_in = nnx.Linear(d_model, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc_out = nnx.Linear(mlp_dim, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, task_ids, mask, deterministic):
        del task_ids, mask, deterministic  # same call shape as the sparse layers
        return self.fc_out(jax.nn.gelu(self.fc_in(x))), None  # [B, L, D]


class ResidualAdapter(nnx.Module):
    """x + up(relu(down(LN(x)))), D -> size -> D, with `up` zero-initialized: inserted
    after a trained block it changes nothing until it trains (muNet's adapters)."""

    def __init__(self, d_model: int, size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_int(size, "adapter size", 1)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(d_model, **kw)
        self.down = nnx.Linear(d_model, size, **kw)
        self.up = nnx.Linear(size, d_model, kernel_init=nnx.initializers.zeros, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.up(jax.nn.relu(self.down(self.norm(x)))).astype(x.dtype)  # [B, L, D]


class SparseMLP(nnx.Module):
    """`multitask_moe.MoE` in the block call shape."""

    def __init__(
        self,
        d_model: int,
        settings: MoESettings,
        num_tasks: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.moe = _from_settings(MoE, settings, d_model, num_tasks, dtype, param_dtype, rngs)

    def __call__(self, x, *, task_ids, mask, deterministic):
        # Padding is not routed: it takes no capacity and stays out of the routing stats.
        return self.moe(x, task_ids, mask=mask, deterministic=deterministic)  # [B, L, D], aux


class DenseAttention(nnx.Module):
    """Multi-head self-attention over the real tokens (padding keys are masked out)."""

    def __init__(self, d_model: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.attention = nnx.MultiHeadAttention(
            num_heads,
            d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            decode=False,
            keep_rngs=False,
            rngs=rngs,
        )

    def __call__(self, x, *, task_ids, mask, deterministic):
        del task_ids
        # Key-only mask [B, 1, 1, L]: a padded query still attends somewhere (no all-masked
        # softmax rows), and its output is dropped by the masked pooling anyway.
        key_mask = mask[:, None, None, :]
        return self.attention(x, mask=key_mask, deterministic=deterministic), None


class SparseAttention(nnx.Module):
    """`multitask_moe.MoA` (mixture of attention heads) in the block call shape."""

    def __init__(
        self,
        d_model: int,
        settings: MoASettings,
        num_tasks: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.moa = _from_settings(MoA, settings, d_model, num_tasks, dtype, param_dtype, rngs)

    def __call__(self, x, *, task_ids, mask, deterministic):
        return self.moa(x, task_ids, mask=mask, deterministic=deterministic)


class Block(nnx.Module):
    """x + attn(LN(x)); x + mlp(LN(x)). Returns (x [B, L, D], {"moa"|"moe": aux})."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        mlp_dim: int,
        num_tasks: int,
        *,
        moe: MoESettings | None,
        moa: MoASettings | None,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(d_model, **kw)
        self.attention = (
            SparseAttention(d_model, moa, num_tasks, **kw)
            if moa is not None
            else DenseAttention(d_model, num_heads, **kw)
        )
        self.mlp_norm = nnx.LayerNorm(d_model, **kw)
        self.mlp = (
            SparseMLP(d_model, moe, num_tasks, **kw)
            if moe is not None
            else DenseMLP(d_model, mlp_dim, **kw)
        )

    def __call__(
        self, x: jax.Array, *, task_ids: jax.Array, mask: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
        aux = {}
        kw = dict(task_ids=task_ids, mask=mask, deterministic=deterministic)
        h, attn_aux = self.attention(self.attn_norm(x), **kw)
        x = x + h.astype(x.dtype)
        if attn_aux is not None:
            aux["moa"] = attn_aux
        h, mlp_aux = self.mlp(self.mlp_norm(x), **kw)
        x = x + h.astype(x.dtype)
        if mlp_aux is not None:
            aux["moe"] = mlp_aux
        return x, aux
