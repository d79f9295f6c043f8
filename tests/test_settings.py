"""Layer settings: one path from config.model.moe / config.model.moa to the layers.

Every option a config can set reaches the built layer (a reader per field, and the table of
readers must cover every field); an unknown key is a one-line ValueError naming it.
"""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

from multitask_moe import models
from multitask_moe.core import config_lib
from multitask_moe.moe import MoA, MoASettings, MoE, MoESettings

TASKS, MODALITIES, TOKENS = [3, 4], ["tabular", "image"], (6, 4)

# Field -> (a value other than the base config's, how to read it back from the layer).
MOE_FIELDS = {
    "d_hidden": (24, lambda moe: moe.experts.w_in.shape[-1]),
    "num_experts": (4, lambda moe: moe.router_width),
    "top_k": (1, lambda moe: moe.top_k),
    "routing": ("per_task", lambda moe: moe.router.routing),
    "capacity_factor": (1.5, lambda moe: moe.capacity_factor),
    "eval_capacity_factor": (3.0, lambda moe: moe.eval_capacity_factor),
    "num_shared_experts": (1, lambda moe: moe.shared_experts.num_experts),
    "renormalize_gates": (True, lambda moe: moe.renormalize_gates),
    "router_noise": (0.5, lambda moe: moe.router.noise_std),
    "router_init": ("zeros", lambda moe: moe.router.init),
    "batch_priority": (True, lambda moe: moe.batch_priority),
    "group_size": (6, lambda moe: moe.group_size),
    "dispatch": ("einsum", lambda moe: moe.dispatch),
    "dropless_block_size": (64, lambda moe: moe.dropless_block_size),
    "max_batched_hidden_bytes": (1234, lambda moe: moe.experts.max_batched_hidden_bytes),
    "activation": ("relu", lambda moe: moe.experts.activation),
    "usage_ema_decay": (0.5, lambda moe: moe.usage_ema_decay),
    "kept_experts": ((0, 1, 3), lambda moe: moe.kept_experts),
    "exchange": ("all_to_all", lambda moe: moe.exchange),
    "replicate_indivisible_experts": (True, lambda moe: moe.replicate_indivisible_experts),
    "expert_mask": (True, lambda moe: moe.active_experts is not None),
}
MOA_FIELDS = {
    "num_experts": (4, lambda moa: moa.router_width),
    "top_k": (1, lambda moa: moa.top_k),
    "head_dim": (8, lambda moa: moa.w_query.shape[-1]),
    "routing": ("per_task", lambda moa: moa.router.routing),
    "causal": (True, lambda moa: moa.causal),
    "renormalize_gates": (True, lambda moa: moa.renormalize_gates),
    "router_noise": (0.25, lambda moa: moa.router.noise_std),
    "router_init": ("zeros", lambda moa: moa.router.init),
    "usage_ema_decay": (0.5, lambda moa: moa.usage_ema_decay),
    "kept_experts": ((1, 2), lambda moa: moa.kept_experts),
    "replicate_indivisible_experts": (True, lambda moa: moa.replicate_indivisible_experts),
}


def field_names(settings) -> set[str]:
    return {field.name for field in dataclasses.fields(settings)}


def build(config):
    return models.model_from_config(
        config.model,
        task_num_classes=TASKS,
        task_modalities=MODALITIES,
        token_shape=TOKENS,
        rngs=nnx.Rngs(0),
    )


def test_readers_cover_every_field_of_both_settings():
    assert set(MOE_FIELDS) == field_names(MoESettings)
    assert set(MOA_FIELDS) == field_names(MoASettings)
    # The config sections are made from the same fields.
    config = config_lib.base_config()
    assert set(config.model.moe) == field_names(MoESettings)
    assert set(config.model.moa) == field_names(MoASettings)


def test_every_field_set_in_the_config_reaches_the_built_layers():
    config = config_lib.base_config()
    config.model.update(d_model=16, depth=2, num_heads=2, mlp_dim=32, moe_every=2, moa_every=2)
    for section, fields in (("moe", MOE_FIELDS), ("moa", MOA_FIELDS)):
        for name, (value, _) in fields.items():
            assert config.model[section][name] != value, f"{section}.{name} is already {value!r}"
            config.model[section][name] = value
    model = build(config)
    moa, moe = model.blocks[0].attention.moa, model.blocks[1].mlp.moe
    assert isinstance(moa, MoA) and isinstance(moe, MoE)
    for name, (value, read) in MOE_FIELDS.items():
        assert read(moe) == value, f"moe.{name}"
    for name, (value, read) in MOA_FIELDS.items():
        assert read(moa) == value, f"moa.{name}"
    # Zero-initialized routers really are zero (Mod-Squad's attention routers included).
    assert not moa.router.kernel[...].any() and not moe.router.kernel[...].any()


def test_base_config_defaults_are_the_layers_defaults():
    config = config_lib.base_config()
    for settings, section in ((MoESettings, config.model.moe), (MoASettings, config.model.moa)):
        for field in dataclasses.fields(settings):
            if field.default is not dataclasses.MISSING:
                assert section[field.name] == field.default, field.name


def test_d_hidden_zero_means_the_dense_mlp_split_over_top_k():
    config = config_lib.base_config()
    config.model.update(d_model=16, depth=2, num_heads=2, mlp_dim=32)
    moe = build(config).blocks[1].mlp.moe
    assert moe.experts.w_in.shape[-1] * moe.top_k == 32


@pytest.mark.parametrize("section", ["moe", "moa"])
def test_unknown_key_names_it_and_the_allowed_keys(section):
    config = config_lib.base_config()
    config.model.update(moe_every=2, moa_every=2)
    with config.model[section].unlocked():
        config.model[section].capacity_factr = 1.0
    with pytest.raises(
        ValueError,
        match=r"unknown Mo[EA]Settings key\(s\) \['capacity_factr'\]; allowed: \[.*'top_k'",
    ):
        build(config)
