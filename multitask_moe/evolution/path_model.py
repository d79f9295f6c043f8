"""A path's model: the project's transformer for one task, assembled from components.

A path names, in model order, the components of a MultitaskTransformer with one task:

  stem                 the input stem of the task's modality
  position_embedding   the [L, D] table
  block<i>             transformer block i (dense, MoE or MoA), its statistics included
  adapter<i>           a residual adapter after block i (zero-initialized output)
  final_norm
  head                 the task's head and task embedding (never shared between tasks)

The model is built with the project's own layers (models.model_from_config), so an MoE
block in a path is the same MoE layer as in a trained model. Its state is a pytree; every
leaf belongs to exactly one component (`component_of` its path), which is what lets
components be reused, cloned and locked one by one.

    arch = Architecture(depth=3, adapters=((1, 16),), num_classes=10, modality="image")
    graphdef, fresh = build(model_config, arch, token_shape, seed)
    parts = split(fresh)                     # {component name: Values}
    state = assemble(fresh, parts)           # the inverse
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from multitask_moe import models
from multitask_moe.train import checkpoint

HEAD_LEAVES = ("head_kernel", "head_bias", "task_embedding", "task_loss_scale")
Path = tuple  # a leaf's key path in the nested pure dict: ("blocks", 1, "mlp", ...)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What fixes a path model's shapes (and so its compiled steps)."""

    depth: int
    adapters: tuple[tuple[int, int], ...]  # (block index, size), sorted
    num_classes: int
    modality: str

    def component_names(self) -> tuple[str, ...]:
        """The path's components in model order."""
        names = ["stem", "position_embedding"]
        adapters = dict(self.adapters)
        for i in range(self.depth):
            names.append(f"block{i}")
            if i in adapters:
                names.append(f"adapter{i}")
        return (*names, "final_norm", "head")


@dataclasses.dataclass
class Values:
    """One component's arrays, as {leaf path: numpy array} for parameters and statistics."""

    params: dict[Path, np.ndarray]
    statistics: dict[Path, np.ndarray]

    @property
    def size(self) -> int:
        return int(sum(np.size(v) for v in self.params.values()))


def component_of(path: Path) -> str:
    """The component a state leaf belongs to, from its path."""
    first = path[0]
    if first in HEAD_LEAVES:
        return "head"
    if first == "blocks":
        return f"block{path[1]}"
    if first == "adapters":
        return f"adapter{path[1]}"
    if first == "stem":
        return "stem"
    return str(first)


def model_config_for(base: ml_collections.ConfigDict, arch: Architecture):
    """`base` (a config's model section) with the path's depth and adapters."""
    config = base.copy_and_resolve_references()
    with config.unlocked():
        config.depth = arch.depth
        config.adapters = ml_collections.ConfigDict({str(i): s for i, s in arch.adapters})
    return config


def build(
    base: ml_collections.ConfigDict, arch: Architecture, token_shape: tuple[int, int], seed: int
) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, fresh state {"params", "model_state"} as nnx.State) of the path model."""
    model = models.model_from_config(
        model_config_for(base, arch),
        task_num_classes=[arch.num_classes],
        task_modalities=[arch.modality],
        token_shape=token_shape,
        rngs=nnx.Rngs(seed),
    )
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, {"params": params, "model_state": model_state}


def flatten(state: nnx.State) -> dict[Path, object]:
    """nnx.State -> {leaf path: value} of its pure dict (list indices as ints)."""
    pure = nnx.to_pure_dict(state)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {tuple(_key(k) for k in path): leaf for path, leaf in leaves}


def _key(entry) -> object:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def unflatten(flat: Mapping[Path, object]) -> dict:
    """{leaf path: value} -> the nested pure dict."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def split(state: Mapping[str, nnx.State]) -> dict[str, Values]:
    """{"params", "model_state"} -> {component name: its Values} (host numpy copies)."""
    parts: dict[str, Values] = {}
    for kind, field in (("params", "params"), ("model_state", "statistics")):
        for path, leaf in flatten(state[kind]).items():
            values = parts.setdefault(component_of(path), Values({}, {}))
            getattr(values, field)[path] = np.array(checkpoint.to_storable(leaf), copy=True)
    return parts


def assemble(fresh: Mapping[str, nnx.State], parts: Mapping[str, Values]) -> dict:
    """The state with `fresh`'s structure and every component's values from `parts`."""
    out = {}
    for kind, field in (("params", "params"), ("model_state", "statistics")):
        flat = flatten(fresh[kind])
        for path, leaf in flat.items():
            stored = getattr(parts[component_of(path)], field)[path]
            flat[path] = _restore(stored, leaf)
        state = fresh[kind]
        nnx.replace_by_pure_dict(state, unflatten(flat))
        out[kind] = state
    return out


def _restore(stored: np.ndarray, like):
    if stored.shape != tuple(jax.eval_shape(checkpoint.to_storable, like).shape):
        raise ValueError(f"component values of shape {stored.shape} for a leaf of {like.shape}")
    return checkpoint.from_storable(jax.numpy.asarray(stored), like)


def leaf_trainable(fresh: Mapping[str, nnx.State], trainable: Mapping[str, bool]) -> dict:
    """{"params", "model_state"} trees of scalar bools: each leaf's component's flag."""
    out = {}
    for kind in ("params", "model_state"):
        out[kind] = jax.tree_util.tree_map_with_path(
            lambda path, _: np.bool_(trainable[component_of(tuple(_key(k) for k in path))]),
            nnx.to_pure_dict(fresh[kind]),
        )
    return out
