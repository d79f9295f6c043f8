"""A state in the form Orbax (and the evolution's component pool) can store: typed PRNG
keys (the router-noise streams) as their raw uint32 key data, and back.

Orbax stores plain numeric arrays; the key implementation is fixed by the config (jax's
default), so the raw data is enough to rebuild the keys.
"""

from __future__ import annotations

import jax


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
