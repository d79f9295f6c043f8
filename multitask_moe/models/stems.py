"""Input stems: one per modality, turning a padded token sequence into d_model tokens.

The data pipeline brings every task to one batch layout (multitask_moe/data): `inputs`
[B, L, P] float32, a padded sequence of L tokens of P features, with `mask` [B, L] marking
the real tokens. Image tasks put one flattened patch per token; tabular tasks put one
feature per token with its value in feature 0; text puts one UTF-8 byte per token, byte b
as the value b + 1 in feature 0 (0 = past the end). The stems below read that layout.

Shape legend: B batch, L tokens (sequence length), P features per token, D d_model,
T tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multitask_moe.models.tables import lookup, take_rows

MODALITIES = ("image", "tabular", "text")
TEXT_VOCAB = 257  # 256 byte values + 1, the value 0 of padding


class ImageStem(nnx.Module):
    """Patch embedding: a Dense layer over each flattened patch, [B, L, P] -> [B, L, D]."""

    def __init__(self, patch_features: int, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = nnx.Linear(
            patch_features, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self.proj(inputs)  # [B, L, D]


class TabularStem(nnx.Module):
    """Feature-token embedding: token j = value_j * w_j + b_j, [B, L, P] -> [B, L, D].

    Each feature position j owns a direction w_j [D] and an offset b_j [D] (the
    FT-Transformer numerical embedding), so the model knows *which* feature a token
    carries without a separate position table. Only feature 0 of each token is read.
    """

    def __init__(self, num_tokens: int, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=1.0 / np.sqrt(d_model))
        self.feature_embedding = nnx.Param(
            init(rngs.params(), (num_tokens, d_model), param_dtype)
        )  # [L, D]
        self.feature_bias = nnx.Param(jnp.zeros((num_tokens, d_model), param_dtype))  # [L, D]
        self.dtype = dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        values = inputs[..., 0:1].astype(self.dtype)  # [B, L, 1]
        weight = self.feature_embedding[...].astype(self.dtype)  # [L, D]
        bias = self.feature_bias[...].astype(self.dtype)  # [L, D]
        return values * weight[None] + bias[None]  # [B, L, D]


class TextStem(nnx.Module):
    """Byte embedding: token = E[b + 1] for the byte b it carries, [B, L, P] -> [B, L, D].

    Only feature 0 of each token is read (an integer-valued float in [0, 256]); position
    comes from the model's position embedding, as for image patches.
    """

    def __init__(self, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=1.0)
        self.embedding = nnx.Param(init(rngs.params(), (TEXT_VOCAB, d_model), param_dtype))
        self.dtype = dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        ids = jnp.clip(jnp.round(inputs[..., 0]), 0, TEXT_VOCAB - 1).astype(jnp.int32)  # [B, L]
        # A gather by batch-sharded ids: take_rows names its output sharding (Explicit axes).
        return take_rows(self.embedding[...], ids).astype(self.dtype)  # [B, L, D]


class MultiModalStem(nnx.Module):
    """Picks the stem of each example's modality: inputs [B, L, P], task_ids [B] -> [B, L, D].

    Only the modalities present in the mixture get a stem. With more than one, every
    stem runs on the whole batch and a per-example select keeps the right one: the stems
    are one small matmul each, far cheaper than gathering examples by modality, and the
    batch keeps one static shape (one compile).
    """

    def __init__(
        self,
        task_modalities: Sequence[str],
        token_shape: tuple[int, int],
        d_model: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        unknown = sorted(set(task_modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(f"task modalities {unknown} are not supported; allowed: {MODALITIES}")
        num_tokens, patch_features = token_shape
        self.modalities = tuple(m for m in MODALITIES if m in task_modalities)
        # [T] index into self.modalities: a static tuple (part of the graph, not the state).
        self.task_modality = tuple(self.modalities.index(m) for m in task_modalities)
        # Keyed by modality name, so a model with other tasks finds its stems by name.
        sizes = {
            "image": dict(patch_features=patch_features),
            "tabular": dict(num_tokens=num_tokens),
        }
        stem_class = {"image": ImageStem, "tabular": TabularStem, "text": TextStem}
        self.stems = nnx.Dict(
            {
                modality: stem_class[modality](
                    **sizes.get(modality, {}),
                    d_model=d_model,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for modality in self.modalities
            }
        )

    def __call__(self, inputs: jax.Array, task_ids: jax.Array) -> jax.Array:
        outputs = [self.stems[modality](inputs) for modality in self.modalities]  # [B, L, D]
        if len(outputs) == 1:
            return outputs[0]
        modality = lookup(self.task_modality, task_ids)  # [B]
        tokens = outputs[0]
        for index, out in enumerate(outputs[1:], start=1):
            tokens = jnp.where((modality == index)[:, None, None], out, tokens)
        return tokens  # [B, L, D]
