"""The multitask transformer: stems, task embedding, dense/sparse blocks, per-task heads.

    model = MultitaskTransformer(task_num_classes=[10, 2, 3], task_modalities=["image",
        "image", "tabular"], token_shape=(30, 4), d_model=64, depth=4, num_heads=4,
        mlp_dim=128, moe=MoESettings(num_experts=8, top_k=2, d_hidden=64,
        routing="task_tokens"), moe_every=2, rngs=nnx.Rngs(0))
    logits, aux = model(inputs, mask, task_ids, deterministic=False)

The dense baseline is the same class with moe=None, moa=None: every comparison is like
for like (same stems, embeddings, depth, heads; only the chosen sub-layers differ).

Shape legend: B batch, L tokens, P features per token, D d_model, T tasks, C the largest
number of classes over the tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from multitask_moe.models.blocks import Block, ResidualAdapter
from multitask_moe.models.identity import SparseLayer
from multitask_moe.models.stems import MultiModalStem
from multitask_moe.models.tables import lookup, take_rows
from multitask_moe.moe import MoA, MoASettings, MoE, MoESettings

# Logit given to the classes a task does not have: finite (no inf - inf = NaN in the
# softmax of a float32 row) and far below any real logit, so exp() underflows to 0.
INVALID_CLASS_LOGIT = -1e9


def placement(depth: int, every: int, offset: int) -> tuple[int, ...]:
    """Blocks i < depth with i % every == offset; () when every == 0 (never)."""
    if every < 0:
        raise ValueError(f"a placement period must be >= 0 (0 = never), got {every}")
    if every == 0:
        return ()
    return tuple(i for i in range(depth) if i % every == offset % every)


class MultitaskTransformer(nnx.Module):
    """Multitask transformer with optional MoE MLPs and MoA attention.

    Args:
      task_num_classes: classes of each task, indexed by task id.
      task_modalities: "image", "tabular" or "text" for each task.
      token_shape: (L, P) of the inputs (data.Mixture.token_shape).
      moe_every: MoE MLP in blocks i with i % moe_every == moe_every - 1 (2 = odd blocks,
        1 = all, 0 = none).
      moa_every: MoA attention in blocks i with i % moa_every == 0 (2 = even blocks, as in
        Mod-Squad together with moe_every=2; 0 = none).
      layers: settings of single sparse layers over `moe` / `moa`, by layer name:
        {"block1/moe": {"num_experts": 3}, ...} (an extracted model keeps a different
        number of experts in each layer).
      task_uncertainty: learn one loss scale s_t per task (`task_loss_scale` [T], init 1)
        for uncertainty task weighting (core/step.py).
      adapters: {block index: size} of residual adapters after those blocks
        (blocks.ResidualAdapter, zero-initialized output; the evolution of paths adds them).
      dtype: activation dtype (float32 or bfloat16); heads and the loss stay float32.
      param_dtype: parameter dtype.

    Every task-indexed parameter and statistic tags its task axis (`task_axis` metadata;
    `class_axis` on the heads, `expert_axis` / `route_axis` in the sparse layers), so
    models with other tasks or other experts can be made from this one by name
    (multitask_moe.lifecycle).
    """

    def __init__(
        self,
        *,
        task_num_classes: Sequence[int],
        task_modalities: Sequence[str],
        token_shape: tuple[int, int],
        d_model: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        moe: MoESettings | None = None,
        moa: MoASettings | None = None,
        moe_every: int = 0,
        moa_every: int = 0,
        layers: Mapping[str, Mapping] | None = None,
        task_uncertainty: bool = False,
        adapters: Mapping[int, int] | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_tasks = len(task_num_classes)
        if num_tasks < 1 or len(task_modalities) != num_tasks:
            raise ValueError(
                f"need one modality per task and at least one task, got {len(task_num_classes)}"
                f" class counts and {len(task_modalities)} modalities"
            )
        if min(task_num_classes) < 2:
            raise ValueError(f"every task needs >= 2 classes, got {list(task_num_classes)}")
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.moe_blocks = placement(depth, moe_every, moe_every - 1)
        self.moa_blocks = placement(depth, moa_every, 0)
        if self.moe_blocks and moe is None:
            raise ValueError(f"moe_every={moe_every} places MoE blocks but no MoE settings given")
        if self.moa_blocks and moa is None:
            raise ValueError(f"moa_every={moa_every} places MoA blocks but no MoA settings given")
        num_tokens, _ = token_shape
        self.num_tasks = num_tasks
        self.task_num_classes = tuple(int(c) for c in task_num_classes)
        self.max_classes = max(self.task_num_classes)
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)

        self.stem = MultiModalStem(
            task_modalities, token_shape, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        layers = dict(layers or {})
        unknown = sorted(set(layers) - set(self.sparse_layer_names()))
        if unknown:
            raise ValueError(
                f"layers names {unknown}, which are not sparse layers of this model; "
                f"allowed: {self.sparse_layer_names()}"
            )

        def settings_of(block, kind, settings):
            name = str(SparseLayer(block, kind))
            return settings.updated(layers[name]) if name in layers else settings

        self.position_embedding = nnx.Param(
            init(rngs.params(), (num_tokens, d_model), param_dtype)
        )  # [L, D]
        # One learned vector per task, added to every token before every block (Mod-Squad).
        self.task_embedding = nnx.Param(
            init(rngs.params(), (num_tasks, d_model), param_dtype), task_axis=0
        )  # [T, D]
        self.blocks = nnx.List(
            [
                Block(
                    d_model,
                    num_heads,
                    mlp_dim,
                    num_tasks,
                    moe=settings_of(i, "moe", moe) if i in self.moe_blocks else None,
                    moa=settings_of(i, "moa", moa) if i in self.moa_blocks else None,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        adapters = {int(i): size for i, size in dict(adapters or {}).items()}
        outside = sorted(i for i in adapters if not 0 <= i < depth)
        if outside:
            raise ValueError(
                f"adapters after blocks {outside}; the model has blocks 0..{depth - 1}"
            )
        # Keyed by the block they follow ("1"), so a path's adapters keep their names.
        self.adapters = nnx.Dict(
            {
                str(i): ResidualAdapter(
                    d_model, size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                for i, size in sorted(adapters.items())
            }
        )
        self.final_norm = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Batched heads: task t reads head_kernel[t] [D, C]; zero-initialized so every task
        # starts at the uniform prediction over its own classes.
        self.head_kernel = nnx.Param(
            jnp.zeros((num_tasks, d_model, self.max_classes), param_dtype),
            task_axis=0,
            class_axis=2,
        )  # [T, D, C]
        self.head_bias = nnx.Param(
            jnp.zeros((num_tasks, self.max_classes), param_dtype), task_axis=0, class_axis=1
        )  # [T, C]
        # s_t of uncertainty weighting; 1-D, so it gets no weight decay (step.py).
        self.task_loss_scale = (
            nnx.Param(jnp.ones((num_tasks,), jnp.float32), task_axis=0)
            if task_uncertainty
            else nnx.data(None)
        )  # [T]

    def sparse_layer_names(self) -> list[str]:
        """Names of the aux entries this model returns, in block order."""
        names = []
        for i in sorted(set(self.moa_blocks) | set(self.moe_blocks)):
            names += [str(SparseLayer(i, "moa"))] if i in self.moa_blocks else []
            names += [str(SparseLayer(i, "moe"))] if i in self.moe_blocks else []
        return names

    def sparse_layers(self) -> dict[str, MoE | MoA]:
        """{"block<i>/moe" | "block<i>/moa": the layer}, in block order."""
        return {name: self.sparse_layer(name) for name in self.sparse_layer_names()}

    def sparse_layer(self, name: str) -> MoE | MoA:
        node = self
        for key in SparseLayer.parse(name).state_path:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        return node

    def usage_tables(self) -> dict[str, jax.Array]:
        """{layer name: usage EMA [T, E]} of every sparse layer that keeps one."""
        return {
            name: layer.usage[...]
            for name, layer in self.sparse_layers().items()
            if layer.usage is not None
        }

    def record_usage(self, aux: Mapping[str, Mapping[str, jax.Array]]) -> None:
        """One training step of every sparse layer's usage EMA, from the aux of a forward."""
        for name, layer in self.sparse_layers().items():
            layer.record_usage(aux[name])

    def features(
        self,
        inputs: jax.Array,
        mask: jax.Array,
        task_ids: jax.Array,
        *,
        deterministic: bool,
    ) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
        """inputs [B, L, P], mask [B, L] bool, task_ids [B] int32 -> (pooled features
        [B, D] float32 that the task's head reads, the aux of every sparse layer)."""
        task_ids = task_ids.astype(jnp.int32)
        x = self.stem(inputs, task_ids)  # [B, L, D]
        x = x + self.position_embedding[...].astype(self.dtype)[None]  # [B, L, D]
        task_vector = take_rows(self.task_embedding[...], task_ids).astype(self.dtype)  # [B, D]
        task_vector = task_vector[:, None]  # [B, 1, D]
        aux = {}
        for i, block in enumerate(self.blocks):
            x, block_aux = block(
                x + task_vector, task_ids=task_ids, mask=mask, deterministic=deterministic
            )
            aux.update({str(SparseLayer(i, kind)): value for kind, value in block_aux.items()})
            if str(i) in self.adapters:
                x = self.adapters[str(i)](x)
        x = self.final_norm(x).astype(jnp.float32)  # [B, L, D]
        weights = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
        # Masked mean over the real tokens (each example has at least one).
        pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)  # [B, D]
        return pooled, aux

    def __call__(
        self,
        inputs: jax.Array,
        mask: jax.Array,
        task_ids: jax.Array,
        *,
        deterministic: bool,
    ) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
        """inputs [B, L, P], mask [B, L] bool, task_ids [B] int32 ->
        (logits [B, C] float32, {"block<i>/moe"|"block<i>/moa": aux of that layer})."""
        task_ids = task_ids.astype(jnp.int32)
        pooled, aux = self.features(inputs, mask, task_ids, deterministic=deterministic)
        return self.head(pooled, task_ids), aux

    def head(self, pooled: jax.Array, task_ids: jax.Array) -> jax.Array:
        """pooled features [B, D], task_ids [B] -> logits [B, C] float32 of each example's
        task head (INVALID_CLASS_LOGIT past the task's own classes)."""
        task_ids = task_ids.astype(jnp.int32)
        kernel = take_rows(self.head_kernel[...], task_ids).astype(jnp.float32)  # [B, D, C]
        bias = take_rows(self.head_bias[...], task_ids).astype(jnp.float32)  # [B, C]
        logits = jnp.einsum("bd,bdc->bc", pooled, kernel) + bias  # [B, C]
        num_classes = lookup(self.task_num_classes, task_ids)  # [B]
        valid = jnp.arange(self.max_classes)[None, :] < num_classes[:, None]  # [B, C]
        return jnp.where(valid, logits, INVALID_CLASS_LOGIT)
