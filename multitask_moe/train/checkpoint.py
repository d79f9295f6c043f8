"""Orbax checkpoints of the train state plus the data position, in workdir/checkpoints.

Each checkpoint holds two items: "state" (the sharded train state pytree) and "progress"
(JSON: the step, the number of batches the data iterator has served, the mesh it was
written on). Saves are asynchronous: the loop goes on while the arrays are written, and
only the next save or `close()` waits. Restoring takes the target shardings, so a
checkpoint written on one mesh restores onto another (each process reads its shards).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def to_storable(tree):
    """Typed PRNG keys (e.g. router-noise rng state) -> their raw uint32 key data.

    Orbax stores plain numeric arrays; the key implementation is fixed by the config
    (jax's default), so the raw data is enough to rebuild the keys.
    """

    def convert(leaf):
        if not _is_key(leaf):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.eval_shape(jax.random.key_data, leaf)
        return jax.random.key_data(leaf)

    return jax.tree.map(convert, tree)


def from_storable(tree, like):
    """Inverse of to_storable: re-wraps key data wherever `like` holds a typed key."""

    def convert(leaf, like_leaf):
        if not _is_key(like_leaf):
            return leaf
        return jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like_leaf))

    return jax.tree.map(convert, tree, like)


def abstract_storable(abstract_state):
    """ShapeDtypeStructs (with shardings) of to_storable(state)."""

    def convert(leaf):
        if not _is_key(leaf):
            return leaf
        data = jax.eval_shape(jax.random.key_data, leaf)
        # key_data adds a trailing dimension; it stays unsharded.
        sharding = jax.sharding.NamedSharding(
            leaf.sharding.mesh, jax.sharding.PartitionSpec(*leaf.sharding.spec, None)
        )
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

    return jax.tree.map(convert, abstract_state)


class Checkpoints:
    """CheckpointManager for one workdir: save(step, state, progress), restore_latest()."""

    def __init__(self, directory: str, *, keep: int, enable_async: bool = True):
        # Orbax wants an absolute path; gs:// buckets already are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=enable_async
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "progress")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, progress: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` and `progress` at `step`."""
        if step in self.manager.all_steps():
            return  # e.g. the final step right after a periodic save of the same step
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_storable(state)),
                progress=ocp.args.JsonSave(_plain(progress)),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto the shardings of `abstract_state` (any mesh)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_storable(abstract_state)),
                progress=ocp.args.JsonRestore(),
            ),
        )
        state = from_storable(restored["state"], abstract_state)
        return state, dict(restored["progress"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _plain(value):
    """JSON-able copy of progress values (numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
