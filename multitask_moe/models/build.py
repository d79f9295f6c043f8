"""Builds a MultitaskTransformer from the `model` section of a config (configs/*.py).

model = build.model_from_config(config.model, task_num_classes=[10, 3],
                                task_modalities=["image", "tabular"],
                                token_shape=(30, 4), rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from multitask_moe.models.blocks import MoASettings, MoESettings
from multitask_moe.models.model import MultitaskTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_name(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def moe_settings(model_config: Mapping) -> MoESettings | None:
    """MoESettings from config.model.moe, or None when no block is an MoE block."""
    if not model_config["moe_every"]:
        return None
    moe = model_config["moe"]
    top_k = moe["top_k"]
    # None: Mod-Squad's sizing, active MLP compute of a token = one dense MLP of mlp_dim.
    expert_dim = moe["expert_dim"] or model_config["mlp_dim"] // top_k
    return MoESettings(
        num_experts=moe["num_experts"],
        top_k=top_k,
        expert_dim=expert_dim,
        routing=moe["routing"],
        capacity_factor=moe["capacity_factor"],
        eval_capacity_factor=moe["eval_capacity_factor"],
        num_shared_experts=moe["num_shared_experts"],
        renormalize_gates=moe["renormalize_gates"],
        router_noise=moe["router_noise"],
        router_init=moe["router_init"],
        batch_priority=moe["batch_priority"],
        group_size=moe["group_size"],
        dispatch=moe["dispatch"],
    )


def moa_settings(model_config: Mapping) -> MoASettings | None:
    """MoASettings from config.model.moa, or None when no block is an MoA block."""
    if not model_config["moa_every"]:
        return None
    moa = model_config["moa"]
    return MoASettings(
        num_experts=moa["num_experts"],
        top_k=moa["top_k"],
        head_dim=moa["head_dim"],
        routing=moa["routing"],
    )


def model_from_config(
    model_config: Mapping,
    *,
    task_num_classes: Sequence[int],
    task_modalities: Sequence[str],
    token_shape: tuple[int, int],
    rngs: nnx.Rngs,
) -> MultitaskTransformer:
    """The model described by `model_config` (a ConfigDict or a plain mapping)."""
    return MultitaskTransformer(
        task_num_classes=task_num_classes,
        task_modalities=task_modalities,
        token_shape=tuple(token_shape),
        d_model=model_config["d_model"],
        depth=model_config["depth"],
        num_heads=model_config["num_heads"],
        mlp_dim=model_config["mlp_dim"],
        moe=moe_settings(model_config),
        moa=moa_settings(model_config),
        moe_every=model_config["moe_every"],
        moa_every=model_config["moa_every"],
        dtype=dtype_from_name(model_config["dtype"]),
        param_dtype=dtype_from_name(model_config["param_dtype"]),
        rngs=rngs,
    )
