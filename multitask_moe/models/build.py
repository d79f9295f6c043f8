"""Builds a MultitaskTransformer from the `model` section of a config (configs/*.py).

model = build.model_from_config(config.model, task_num_classes=[10, 3],
                                task_modalities=["image", "tabular"],
                                token_shape=(30, 4), rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from multitask_moe.models.model import MultitaskTransformer
from multitask_moe.moe import MoASettings, MoESettings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_name(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def moe_settings(model_config: Mapping, group_size: int | None = None) -> MoESettings | None:
    """MoESettings from config.model.moe (keys: MoESettings' fields), or None when no
    block is an MoE block.

    d_hidden=0 means mlp_dim // top_k: top_k experts of that size give a token the active
    MLP compute of one dense MLP of mlp_dim (Mod-Squad's sizing). group_size: the routing
    group to use where the config leaves it None (core.build.routing_group_size picks one per
    device's share of a batch).
    """
    if not model_config["moe_every"]:
        return None
    moe = dict(model_config["moe"].items())  # a ConfigDict section or a plain mapping
    if not moe.get("d_hidden") and "top_k" in moe:
        moe["d_hidden"] = model_config["mlp_dim"] // moe["top_k"]
    if moe.get("group_size") is None:
        moe["group_size"] = group_size
    return MoESettings.from_mapping(moe)


def moa_settings(model_config: Mapping) -> MoASettings | None:
    """MoASettings from config.model.moa (keys: MoASettings' fields), or None when no
    block is an MoA block."""
    if not model_config["moa_every"]:
        return None
    return MoASettings.from_mapping(model_config["moa"])


def model_from_config(
    model_config: Mapping,
    *,
    task_num_classes: Sequence[int],
    task_modalities: Sequence[str],
    token_shape: tuple[int, int],
    rngs: nnx.Rngs,
    group_size: int | None = None,
    task_uncertainty: bool = False,
) -> MultitaskTransformer:
    """The model described by `model_config` (a ConfigDict or a plain mapping);
    group_size: the MoE routing group where model.moe.group_size is None;
    task_uncertainty: learned per-task loss scales (config.task_weighting="uncertainty").

    model_config["layers"] (optional): {"block<i>/moe" | "block<i>/moa": {setting: value}}
    overrides of single sparse layers (an extracted model's per-layer expert counts).
    """
    layers = {name: dict(values.items()) for name, values in model_config.get("layers", {}).items()}
    return MultitaskTransformer(
        task_num_classes=task_num_classes,
        task_modalities=task_modalities,
        token_shape=tuple(token_shape),
        d_model=model_config["d_model"],
        depth=model_config["depth"],
        num_heads=model_config["num_heads"],
        mlp_dim=model_config["mlp_dim"],
        moe=moe_settings(model_config, group_size),
        moa=moa_settings(model_config),
        moe_every=model_config["moe_every"],
        moa_every=model_config["moa_every"],
        layers=layers,
        task_uncertainty=task_uncertainty,
        adapters={int(i): size for i, size in model_config.get("adapters", {}).items()},
        dtype=dtype_from_name(model_config["dtype"]),
        param_dtype=dtype_from_name(model_config["param_dtype"]),
        rngs=rngs,
    )
