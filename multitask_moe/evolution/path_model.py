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
leaf, or every expert slice of a leaf, belongs to exactly one component (`owners`, the
models.Owners every state cut of the project uses), which is what lets components be
reused, cloned and locked one by one.

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
from multitask_moe.models.identity import ComponentName
from multitask_moe.models.keys import KeyPath, axis_tags, flatten, key_names, unflatten
from multitask_moe.models.ownership import Owners

HEAD_LEAVES = ("head_kernel", "head_bias", "task_embedding", "task_loss_scale")
# The model's lists of blocks and adapters, and the component kind of their entries.
INDEXED_LEAVES = {"blocks": "block", "adapters": "adapter"}
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
        """The path's components in model order (models.ComponentName's string form)."""
        names = [ComponentName("stem"), ComponentName("position_embedding")]
        adapters, experts = dict(self.adapters), dict(self.experts)
        for i in range(self.depth):
            names.append(ComponentName("block", i))
            names.extend(ComponentName.expert_slot(i, k) for k in experts.get(i, ()))
            if i in adapters:
                names.append(ComponentName("adapter", i))
        names += [ComponentName("final_norm"), ComponentName("head")]
        return tuple(map(str, names))

    @property
    def shapes(self) -> Architecture:
        """The architecture without its active slots: what the compiled steps depend on."""
        return dataclasses.replace(self, experts=())


@dataclasses.dataclass
class Values:
    """One component's arrays, as {leaf path: numpy array} for parameters and statistics."""

    params: dict[KeyPath, np.ndarray]
    statistics: dict[KeyPath, np.ndarray]

    @property
    def size(self) -> int:
        return int(sum(np.size(v) for v in self.params.values()))


def component_of(path: KeyPath) -> str | None:
    """The component a state leaf (or an Adam moment of one) belongs to, from its path;
    None for the leaves set from the architecture."""
    first = path[0]
    if path[-1] in ARCH_LEAVES:
        return None
    if first in HEAD_LEAVES:
        return str(ComponentName("head"))
    if first in INDEXED_LEAVES:  # a block's leaves, or an adapter's
        return str(ComponentName(INDEXED_LEAVES[first], int(path[1])))
    return str(ComponentName(first))  # stem, position_embedding, final_norm


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


def owners(arch: Architecture, state: Mapping[str, nnx.State]) -> Owners:
    """Which component owns each leaf of `state` (a fresh or trained path model of
    `arch`), or each active slot's slice of an expert-indexed leaf of an MoE block with
    slots (its expert axis, read from the axis tags the layers give their variables). An
    optimizer state's moments have their parameters' paths, so the same owners cut them.
    Free slots and the leaves set from the architecture belong to nobody."""
    # The MoE layers with slots: where their `active_experts` lives (a block may also
    # hold an MoA layer, whose expert-indexed leaves are not slots).
    blocks = dict(arch.experts)
    layers = [
        path[:-1]
        for path in flatten(state["model_state"])
        if path[-1] in ARCH_LEAVES and path[1] in blocks
    ]
    sliced = {}
    for kind in ("params", "model_state"):
        for path, tags in axis_tags(state[kind]).items():
            axis = tags.get("expert_axis", tags.get("route_axis"))
            if axis is not None and any(path[: len(p)] == p for p in layers):
                sliced[path] = (
                    axis,
                    {k: str(ComponentName.expert_slot(path[1], k)) for k in blocks[path[1]]},
                )
    return Owners(whole=component_of, sliced=sliced)


def active_mask(arch: Architecture, block: int, slots: int) -> np.ndarray:
    """[slots] bool: the expert slots of `block` that route."""
    mask = np.zeros((slots,), bool)
    mask[list(dict(arch.experts).get(block, ()))] = True
    return mask


def split(state: Mapping[str, nnx.State], arch: Architecture) -> dict[str, Values]:
    """{"params", "model_state"} -> {component name: its Values} (host numpy copies)."""
    cut = owners(arch, state)
    parts: dict[str, Values] = {}
    for kind, field in (("params", "params"), ("model_state", "statistics")):
        flat = {
            path: np.array(storable.to_storable(leaf), copy=True)
            for path, leaf in flatten(state[kind]).items()
        }
        for name, values in cut.split(flat).items():
            getattr(parts.setdefault(name, Values({}, {})), field).update(values)
    return parts


def assemble(
    fresh: Mapping[str, nnx.State], parts: Mapping[str, Values], arch: Architecture
) -> dict:
    """The state with `fresh`'s structure and every component's values from `parts`."""
    cut = owners(arch, fresh)
    out = {}
    for kind, field in (("params", "params"), ("model_state", "statistics")):
        flat = flatten(fresh[kind])
        for path, leaf in flat.items():
            like = np.asarray(storable.to_storable(leaf))
            if path[-1] in ARCH_LEAVES:
                value = active_mask(arch, path[1], like.shape[-1])
            else:
                value = cut.joined(
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
    cut = owners(arch, fresh)
    out = {}
    for kind in ("params", "model_state"):
        out[kind] = jax.tree_util.tree_map_with_path(
            lambda path, leaf: cut.mask(key_names(path), np.shape(leaf), trainable),
            nnx.to_pure_dict(fresh[kind]),
        )
    return out
