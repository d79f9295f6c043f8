"""A model state's leaves by path: the one normalizer of jax key paths, a path's text
in messages and as a stored key, flattening with flax.traverse_util, the parameter of an
Adam moment, and the axis tags the layers give their variables.

A leaf's path is the tuple of its keys in the nested pure dict (nnx.to_pure_dict):
("blocks", 1, "mlp", "kernel"); list indices are ints.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx, traverse_util

KeyPath = tuple  # a leaf's keys in the nested pure dict: ("blocks", 1, "mlp", "kernel")


def key_names(key_path, *, variables: bool = False) -> KeyPath:
    """A jax key path into a pure dict, an nnx.State or an optimizer state over one, as
    the leaf's path in the pure dict ("blocks", 1, ..., "kernel"): dict keys, sequence
    indices and attribute names, without the Variable's `.value` attribute, which the
    pure dict does not have. variables=True keeps it: the name of the leaf in a stored
    nnx.State (a checkpoint's metadata holds the Variable's value under "value")."""
    names = []
    for entry in key_path:
        if not variables and isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                names.append(getattr(entry, attr))
                break
        else:
            names.append(entry)
    return tuple(names)


def path_text(path: KeyPath) -> str:
    """A leaf's path in messages and logs: "blocks/1/mlp/kernel"."""
    return "/".join(map(str, path))


def stored_key(path: KeyPath) -> str:
    """A leaf's path as a flat key an Orbax item stores ("blocks.#1.mlp.kernel": no "/",
    which Orbax would read as nesting, and list indices marked, so it reads back)."""
    return ".".join(f"#{k}" if isinstance(k, int) else str(k) for k in path)


def path_of_stored_key(text: str) -> KeyPath:
    """The inverse of `stored_key`."""
    return tuple(int(k[1:]) if k.startswith("#") else k for k in text.split("."))


def flatten(state) -> dict[KeyPath, object]:
    """An nnx.State or a pure dict -> {leaf path: value} (list indices as ints)."""
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else dict(state)
    return traverse_util.flatten_dict(pure)


def unflatten(flat: Mapping[KeyPath, object]) -> dict:
    """{leaf path: value} -> the nested pure dict."""
    return traverse_util.unflatten_dict(dict(flat))


def adam_moment_key(key_path) -> tuple[str, KeyPath] | None:
    """("mu" | "nu", parameter path) of an Adam moment leaf of an optimizer state over the
    parameters (core.state.adamw); None for other leaves (the step count, the injected
    hyperparameters)."""
    names = [getattr(k, "name", None) for k in key_path]
    for slot in ("mu", "nu"):
        if slot in names:
            index = names.index(slot)
            return slot, key_names(key_path[index + 1 :])
    return None


AXIS_TAGS = ("task_axis", "expert_axis", "route_axis", "class_axis")


def axis_tags(model: nnx.Module | nnx.State) -> dict[KeyPath, dict[str, int]]:
    """{path: {tag: axis}} of every tagged variable of `model` (abstract or concrete), or
    of a state split from one (e.g. the abstract parameters of a StateSpec)."""
    tags = {}
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    for path, variable in nnx.to_flat_state(state):
        metadata = variable.get_metadata()
        found = {tag: metadata[tag] for tag in AXIS_TAGS if metadata.get(tag) is not None}
        if found:
            tags[tuple(path)] = found
    return tags
