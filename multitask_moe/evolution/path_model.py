"""A path's model: the project's transformer for one task, assembled from components.

A path names, in model order, the components of a MultitaskTransformer with one task:

  stem                 the input stem of the task's modality
  position_embedding   the [L, D] table
  block<i>             transformer block i (dense, MoE or MoA), its statistics included
  adapter<i>           a residual adapter after block i (zero-initialized output)
  final_norm
  head                 the task's head and task embedding (never shared between tasks)

With expert slots (`Architecture.expert_slots` > 0), an MoE block is finer grained: it
holds that many expert slots, and each active slot k is its own component

  block<i>.expert<k>   expert k's slice of every expert-indexed leaf of block i's MoE
                       (its MLP weights, its router column, its usage statistics)

while `block<i>` keeps the rest (attention, norms). The slots a path does not use are
switched off in the layer's routing (MoE `expert_mask`): no token reaches them and their
values never matter, so a child can clone one expert into a free slot and reuse all the
others, and the paths that do not have the slot never route to it. Which slots are active
is state, not shape: every active set of one architecture runs the same compiled steps.

The model is built with the project's own layers (models.model_from_config), so an MoE
block in a path is the same MoE layer as in a trained model. Its state is a pytree; every
leaf, or every expert slice of a leaf, belongs to exactly one component (`Layout`), which
is what lets components be reused, cloned and locked one by one.

    arch = Architecture(depth=3, adapters=((1, 16),), num_classes=10, modality="image")
    graphdef, fresh = build(model_config, arch, token_shape, seed)
    parts = split(fresh, arch)               # {component name: Values}
    state = assemble(fresh, parts, arch)     # the inverse
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from multitask_moe import models
from multitask_moe.core import storable
from multitask_moe.models.surgery import KeyPath, axis_tags, flatten, key_names, unflatten

HEAD_LEAVES = ("head_kernel", "head_bias", "task_embedding", "task_loss_scale")
# Leaves set from the architecture, owned by no component: which expert slots route.
ARCH_LEAVES = ("active_experts",)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What fixes a path model's shapes (and so its compiled steps)."""

    depth: int
    adapters: tuple[tuple[int, int], ...]  # (block index, size), sorted
    num_classes: int
    modality: str
    # Expert slots of every MoE block (0: an MoE block is one component), and the active
    # slots of each MoE block below `depth`: (block index, sorted slots), sorted.
    expert_slots: int = 0
    experts: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def component_names(self) -> tuple[str, ...]:
        """The path's components in model order."""
        names = ["stem", "position_embedding"]
        adapters, experts = dict(self.adapters), dict(self.experts)
        for i in range(self.depth):
            names.append(f"block{i}")
            names.extend(expert_name(i, k) for k in experts.get(i, ()))
            if i in adapters:
                names.append(f"adapter{i}")
        return (*names, "final_norm", "head")

    @property
    def shapes(self) -> Architecture:
        """The architecture without its active slots: what the compiled steps depend on."""
        return dataclasses.replace(self, experts=())


def expert_name(block: int, slot: int) -> str:
    return f"block{block}.expert{slot}"


@dataclasses.dataclass
class Values:
    """One component's arrays, as {leaf path: numpy array} for parameters and statistics."""

    params: dict[KeyPath, np.ndarray]
    statistics: dict[KeyPath, np.ndarray]

    @property
    def size(self) -> int:
        return int(sum(np.size(v) for v in self.params.values()))


def component_of(path: KeyPath) -> str:
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
        if arch.expert_slots:
            config.moe.num_experts = arch.expert_slots
            config.moe.expert_mask = True
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which component owns each leaf of a path model, or each expert slice of a leaf.

    axes: {leaf path: its expert-slot axis} for the expert-indexed leaves of the MoE
    blocks with slots (read from the axis tags the layers give their variables).
    """

    arch: Architecture
    axes: Mapping[KeyPath, int]

    @classmethod
    def of(cls, arch: Architecture, state: Mapping[str, nnx.State]) -> Layout:
        """The layout of `state` (a fresh or trained path model of `arch`)."""
        # The MoE layers with slots: where their `active_experts` lives (a block may also
        # hold an MoA layer, whose expert-indexed leaves are not slots).
        blocks = dict(arch.experts)
        layers = [
            path[:-1]
            for path in flatten(state["model_state"])
            if path[-1] in ARCH_LEAVES and path[1] in blocks
        ]
        axes = {}
        for kind in ("params", "model_state"):
            for path, tags in axis_tags(state[kind]).items():
                path = key_names(path)
                axis = tags.get("expert_axis", tags.get("route_axis"))
                if axis is not None and any(path[: len(p)] == p for p in layers):
                    axes[path] = axis
        return cls(arch, axes)

    def _slots(self, path: KeyPath) -> tuple[int, ...]:
        return dict(self.arch.experts)[path[1]]

    def pieces(self, path: KeyPath, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """[(component, its part of `value`)] for the leaf at `path`: the whole leaf, or
        for an expert-indexed leaf one slice per active slot (value [.., S, ..] -> [.., ..],
        S slots on the leaf's slot axis)."""
        if path[-1] in ARCH_LEAVES:
            return []
        if path not in self.axes:
            return [(component_of(path), value)]
        axis = self.axes[path]
        return [(expert_name(path[1], k), np.take(value, k, axis=axis)) for k in self._slots(path)]

    def joined(self, path: KeyPath, fresh: np.ndarray, part_of) -> np.ndarray:
        """The leaf at `path` from its components' parts (`part_of(component)`, None where a
        component has none, e.g. no optimizer state yet: `fresh` stays there); the inverse
        of `pieces`. Free slots keep `fresh`'s values, which routing never reads."""
        if path[-1] in ARCH_LEAVES:
            return self.active_mask(path[1], fresh.shape[-1])
        if path not in self.axes:
            part = part_of(component_of(path))
            return fresh if part is None else part
        value, axis = np.array(fresh, copy=True), self.axes[path]
        for k in self._slots(path):
            part = part_of(expert_name(path[1], k))
            if part is not None:
                index = [slice(None)] * value.ndim
                index[axis] = k
                value[tuple(index)] = part
        return value

    def active_mask(self, block: int, slots: int) -> np.ndarray:
        mask = np.zeros((slots,), bool)
        mask[list(dict(self.arch.experts).get(block, ()))] = True
        return mask

    def trainable_mask(self, path: KeyPath, shape, trainable: Mapping[str, bool]) -> np.ndarray:
        """A bool mask broadcastable to the leaf: per slot for an expert-indexed leaf (the
        same shape for every active set, so one compile), else a scalar."""
        if path[-1] in ARCH_LEAVES:
            return np.bool_(False)
        if path not in self.axes:
            return np.bool_(trainable[component_of(path)])
        axis = self.axes[path]
        mask = np.zeros([shape[axis] if d == axis else 1 for d in range(len(shape))], bool)
        index = [0] * len(shape)
        for k in self._slots(path):
            index[axis] = k
            mask[tuple(index)] = trainable[expert_name(path[1], k)]
        return mask


def split(state: Mapping[str, nnx.State], arch: Architecture) -> dict[str, Values]:
    """{"params", "model_state"} -> {component name: its Values} (host numpy copies)."""
    layout = Layout.of(arch, state)
    parts: dict[str, Values] = {}
    for kind, field in (("params", "params"), ("model_state", "statistics")):
        for path, leaf in flatten(state[kind]).items():
            value = np.array(storable.to_storable(leaf), copy=True)
            for name, piece in layout.pieces(path, value):
                getattr(parts.setdefault(name, Values({}, {})), field)[path] = piece
    return parts


def assemble(
    fresh: Mapping[str, nnx.State], parts: Mapping[str, Values], arch: Architecture
) -> dict:
    """The state with `fresh`'s structure and every component's values from `parts`."""
    layout = Layout.of(arch, fresh)
    out = {}
    for kind, field in (("params", "params"), ("model_state", "statistics")):
        flat = flatten(fresh[kind])
        for path, leaf in flat.items():
            like = np.asarray(storable.to_storable(leaf))
            value = layout.joined(
                path, like, lambda name, f=field, p=path: getattr(parts[name], f)[p]
            )
            flat[path] = _restore(value, leaf)
        state = fresh[kind]
        nnx.replace_by_pure_dict(state, unflatten(flat))
        out[kind] = state
    return out


def _restore(stored: np.ndarray, like):
    if stored.shape != tuple(jax.eval_shape(storable.to_storable, like).shape):
        raise ValueError(f"component values of shape {stored.shape} for a leaf of {like.shape}")
    return storable.from_storable(jax.numpy.asarray(stored), like)


def leaf_trainable(
    fresh: Mapping[str, nnx.State], trainable: Mapping[str, bool], arch: Architecture
) -> dict:
    """{"params", "model_state"} trees of bool masks: each leaf's (or expert slice's)
    component's flag."""
    layout = Layout.of(arch, fresh)
    out = {}
    for kind in ("params", "model_state"):
        out[kind] = jax.tree_util.tree_map_with_path(
            lambda path, leaf: layout.trainable_mask(key_names(path), np.shape(leaf), trainable),
            nnx.to_pure_dict(fresh[kind]),
        )
    return out
