"""Who owns each leaf of a model's state, or each slice of a leaf along one tagged axis.

Every cut and stitch of a model's state asks the same question: which owner (a task, an
expert slot, an evolution component, "what trains" and "what stays") a leaf belongs to,
or, for a leaf with a tagged axis (models/keys.axis_tags), which owner each of its
slices along that axis belongs to. `Owners` is that answer, and everything the lifecycle
does with it is here once:

    owners = Owners(whole=owner_of_path, sliced={path: (axis, {index: owner})})
    parts = owners.split(flat)                 # {owner: {path: its piece}}
    value = owners.joined(path, fresh, part_of)  # the inverse, leaf by leaf
    mask = owners.mask(path, shape, flags)     # trains where the owner's flag is True
    moments = owners.moments(opt_state)        # {owner: {("mu" | "nu", path): piece}}
    opt_state = owners.with_moments(opt_state, moments)

The freeze modes of a warm start (surgery.trainable_mask: task rows of the new tasks
train) and evolution's components (evolution/path_model.owners: a block's expert slots
are components of their own) are two ways of building one. An owner is any hashable
value; a leaf or slice owned by None belongs to nobody: it has no piece, keeps its fresh
value when joined and never trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping

import jax
import numpy as np

from multitask_moe.models.keys import KeyPath, adam_moment_key

Owner = Hashable


@dataclasses.dataclass(frozen=True)
class Owners:
    """whole: the owner of a leaf that is not sliced, from its path (None: nobody).
    sliced: {leaf path: (axis, {index: owner})}: the leaves cut along `axis`, each index
    of it owned by its owner; an index not named belongs to nobody."""

    whole: Callable[[KeyPath], Owner | None]
    sliced: Mapping[KeyPath, tuple[int, Mapping[int, Owner]]] = dataclasses.field(
        default_factory=dict
    )

    def pieces(self, path: KeyPath, value: np.ndarray) -> list[tuple[Owner, np.ndarray]]:
        """[(owner, its part of `value`)] for the leaf at `path`: the whole leaf, or one
        slice per owned index of a sliced leaf (value [.., N, ..] -> [.., ..])."""
        if path not in self.sliced:
            owner = self.whole(path)
            return [] if owner is None else [(owner, value)]
        axis, owners = self.sliced[path]
        return [(owner, np.take(value, index, axis=axis)) for index, owner in owners.items()]

    def joined(self, path: KeyPath, fresh: np.ndarray, part_of) -> np.ndarray:
        """The leaf at `path` from its owners' parts (`part_of(owner)`, None where an
        owner has none, e.g. no optimizer state yet: `fresh` stays there); the inverse of
        `pieces`. What nobody owns keeps `fresh`'s values."""
        if path not in self.sliced:
            owner = self.whole(path)
            part = None if owner is None else part_of(owner)
            return fresh if part is None else part
        axis, owners = self.sliced[path]
        value = np.array(fresh, copy=True)
        for index, owner in owners.items():
            part = part_of(owner)
            if part is not None:
                value[(slice(None),) * axis + (index,)] = part
        return value

    def mask(self, path: KeyPath, shape, flags: Mapping[Owner, bool]) -> np.ndarray:
        """A bool mask broadcastable to the leaf, True where its owner's flag is: a scalar
        for a whole leaf, else [1, .., N, .., 1] along the sliced axis (the same shape
        whichever indices are owned, so the masks of one architecture compile once)."""
        if path not in self.sliced:
            owner = self.whole(path)
            return np.bool_(owner is not None and flags[owner])
        axis, owners = self.sliced[path]
        rows = np.zeros((shape[axis],), bool)
        for index, owner in owners.items():
            rows[index] = flags[owner]
        return rows.reshape([shape[axis] if d == axis else 1 for d in range(len(shape))])

    def split(self, flat: Mapping[KeyPath, np.ndarray]) -> dict[Owner, dict[KeyPath, np.ndarray]]:
        """{leaf path: value} -> {owner: {leaf path: its piece}}."""
        parts: dict[Owner, dict[KeyPath, np.ndarray]] = {}
        for path, value in flat.items():
            for owner, piece in self.pieces(path, value):
                parts.setdefault(owner, {})[path] = piece
        return parts

    def moments(self, opt_state) -> dict[Owner, dict[tuple[str, KeyPath], np.ndarray]]:
        """Each owner's pieces of the Adam moments of an optimizer state over the
        parameters (host copies): {owner: {("mu" | "nu", parameter path): piece}}."""
        out: dict[Owner, dict] = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
            key = adam_moment_key(key_path)
            if key is not None:
                for owner, piece in self.pieces(key[1], np.array(leaf, copy=True)):
                    out.setdefault(owner, {})[key] = piece
        return out

    def with_moments(self, opt_state, stored: Mapping[Owner, Mapping]) -> object:
        """`opt_state` with the owners' stored moment pieces (`moments`' form) in their
        leaves or slices; everything else as it was."""
        if not stored:
            return opt_state
        leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
        out = []
        for key_path, leaf in leaves:
            key = adam_moment_key(key_path)
            if key is None:
                out.append(leaf)
                continue
            value = self.joined(
                key[1], np.asarray(leaf), lambda owner, key=key: stored.get(owner, {}).get(key)
            )
            out.append(jax.numpy.asarray(value, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)
