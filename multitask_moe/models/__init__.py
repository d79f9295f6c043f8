"""Multitask transformer built from the MoE / MoA layers.

from multitask_moe import models
model = models.model_from_config(config.model, task_num_classes=[10, 3],
                                 task_modalities=["image", "tabular"],
                                 token_shape=(30, 4), rngs=nnx.Rngs(0))
logits, aux = model(inputs, mask, task_ids, deterministic=False)
"""

from multitask_moe.models.blocks import Block
from multitask_moe.models.build import DTYPES, model_from_config
from multitask_moe.models.identity import ComponentName, SparseLayer
from multitask_moe.models.keys import axis_tags
from multitask_moe.models.model import (
    INVALID_CLASS_LOGIT,
    MultitaskTransformer,
)
from multitask_moe.models.ownership import Owners
from multitask_moe.models.stems import MODALITIES, MultiModalStem
from multitask_moe.models.surgery import (
    FREEZE_MODES,
    RowMap,
    frozen_fraction,
    trainable_mask,
    transplant,
    transplant_state,
)
from multitask_moe.moe import MoASettings, MoESettings

__all__ = [
    "DTYPES",
    "FREEZE_MODES",
    "INVALID_CLASS_LOGIT",
    "MODALITIES",
    "Block",
    "ComponentName",
    "MoASettings",
    "MoESettings",
    "MultiModalStem",
    "MultitaskTransformer",
    "Owners",
    "RowMap",
    "SparseLayer",
    "axis_tags",
    "frozen_fraction",
    "model_from_config",
    "trainable_mask",
    "transplant",
    "transplant_state",
]
