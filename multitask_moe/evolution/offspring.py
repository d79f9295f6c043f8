"""A child of a path (muNet's mutations): its hyperparameters, depth, adapters and expert
slots, and for every component whether it reuses, clones or freshly builds it.

    child_id, trainable = make_child(system, parent_id, task)

A child takes its parent's components; a new task's child gets a new head (and a new
stem for another modality); a block one deeper than the parent's comes from the root;
each inherited component is cloned with probability mu (mutation.component_actions) and
an expert may be cloned into a free slot of its MoE block. Every random draw goes
through system.rng, in the order written here, so a run is reproducible from its seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multitask_moe.evolution import mutation, path_model
from multitask_moe.evolution.settings import LADDERS
from multitask_moe.models.identity import ComponentName

if TYPE_CHECKING:
    from multitask_moe.evolution.system import System


def make_child(system: System, parent_id: int, task: str) -> tuple[int, dict[str, bool]]:
    """A new child path of `parent_id` for `task`, its components added to the pool;
    returns (path id, {component name: trainable})."""
    parent, parent_arch = system.paths[parent_id], system.arch[parent_id]
    rng = system.rng
    hparams = mutation.mutate_hparams(rng, parent.hparams, LADDERS)
    mu = float(hparams["mu"])
    depth = parent_arch.depth
    if rng.random() < mu:  # drop the top block, or take one more of the root's
        root_depth = system.arch[system.root].depth
        grow = depth < root_depth and (depth == 1 or rng.random() < 0.5)
        depth = depth + 1 if grow else max(depth - 1, 1)
    adapters = {i: s for i, s in parent_arch.adapters if i < depth}
    free = [i for i in range(depth) if i not in adapters]
    if free and rng.random() < mu:
        adapters[int(rng.choice(free))] = int(hparams["adapter_size"])
    experts, expert_clones = _mutate_experts(system, rng, parent_id, depth, mu)
    num_classes, modality = system.task_info[task]
    arch = path_model.Architecture(
        depth,
        tuple(sorted(adapters.items())),
        num_classes,
        modality,
        expert_slots=parent_arch.expert_slots,
        experts=experts,
    )

    inherited = {**system.named_components(parent_id), **expert_clones}
    root = system.named_components(system.root)
    new_parts = None
    components, trainable = [], {}
    other_task = parent.task != task
    for name in arch.component_names():
        place = ComponentName.parse(name)
        source = inherited.get(name)
        if place.kind == "head" and other_task:
            source = None  # a new head for a new task
        if place.kind == "stem" and modality != parent_arch.modality:
            source = None
        if place.in_block and source is None:
            source = root.get(name)  # a block (or an expert of one) of the root
        if place.kind == "adapter" and source is not None:
            size = dict(parent_arch.adapters)[place.block]
            source = source if size == adapters[place.block] else None
        if source is None:
            if new_parts is None:
                new_parts = path_model.split(system._fresh(arch)[1], arch)
            cid = system.pool.add(
                name, new_parts[name].params, statistics=new_parts[name].statistics
            )
            system.lineage[cid] = "new"
        else:
            ((_, action),) = mutation.component_actions(rng, [source], system.pool, mu)
            if name in expert_clones:  # an expert cloned into a free slot
                action = mutation.CLONE
            cid = system.pool.clone(source, name) if action == mutation.CLONE else source
            if cid != source:  # a clone of a locked component, or of this task's own
                own = not system.pool[source].locks
                system.lineage[cid] = system.lineage.get(source, "cloned") if own else "cloned"
        components.append(cid)
        trainable[name] = system.pool[cid].trainable
    child = system._add_path(task, components, hparams, arch, parent=parent_id)
    return child, trainable


def _mutate_experts(system: System, rng, parent_id: int, depth: int, mu: float):
    """(active slots per MoE block below `depth`, {new slot's component name: the
    expert component it clones}). Each MoE block with a free slot clones one of its
    experts, chosen uniformly, into its lowest free slot with probability mu; a block
    taken from the root (one more block) comes with the root's experts. Without
    expert slots: ((), {}) and no random draw."""
    parent_arch = system.arch[parent_id]
    if not parent_arch.expert_slots:
        return (), {}
    root_arch = system.arch[system.root]
    sources = {**system.named_components(system.root), **system.named_components(parent_id)}
    active = {i: set(slots) for i, slots in root_arch.experts if i < depth}
    active.update((i, set(slots)) for i, slots in parent_arch.experts if i < depth)
    clones = {}
    for block in sorted(active):
        free = [k for k in range(parent_arch.expert_slots) if k not in active[block]]
        if free and rng.random() < mu:
            cloned = int(rng.choice(sorted(active[block])))
            clones[str(ComponentName.expert_slot(block, free[0]))] = sources[
                str(ComponentName.expert_slot(block, cloned))
            ]
            active[block].add(free[0])
    return tuple((i, tuple(sorted(active[i]))) for i in sorted(active)), clones
