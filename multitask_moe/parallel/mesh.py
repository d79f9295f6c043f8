"""Device meshes for multitask_moe, and the shardings that go with them.

Mesh axes (a config names a subset; their order in the mesh is always this one):

  data    pure data parallelism: parameters replicated, batch sharded.
  fsdp    data parallelism whose parameters may also be sharded (ZeRO-3 style).
  expert  expert parallelism: each device along it holds E / |expert| experts.
  model   tensor parallelism: tokens replicated, weight matrices split.

Why tokens are sharded over ('data', 'fsdp', 'expert') jointly: with expert
parallelism every device of the 'expert' axis must route *different* tokens,
otherwise the expert axis would hold replicas of the same tokens and the
all-to-all would move duplicates. So a batch is split over every axis except
'model', and experts are split over 'expert' only. 'expert' is the innermost
batch axis so that the devices exchanging tokens in the all-to-all are
neighbours in the device order (on a TPU slice or a GPU host: the fast links).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Canonical order of the axes in every mesh this module builds (outermost first).
AXIS_NAMES: tuple[str, ...] = ("data", "fsdp", "expert", "model")
# Axes the batch (leading) dimension of the activations is split over.
BATCH_AXIS_NAMES: tuple[str, ...] = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"


def _mesh_shape_text(mesh: Mesh | jax.sharding.AbstractMesh) -> str:
    return ", ".join(f"{name}={size}" for name, size in mesh.shape.items())


def make_mesh(
    axes: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    axis_types: Sequence[jax.sharding.AxisType] | None = None,
) -> Mesh:
    """Builds a mesh from axis sizes, e.g. ``{"data": -1, "expert": 4}``.

    Args:
      axes: axis name -> size. Names from ``AXIS_NAMES``; size -1 (at most one axis)
        means "all the devices the other axes leave". Axes come out in the order of
        ``AXIS_NAMES`` whatever the order of the mapping.
      devices: the devices to lay out (default: all devices of all processes).
      axis_types: per-axis ``jax.sharding.AxisType`` in mesh order; default is JAX's
        (Explicit), as for ``jax.make_mesh``.

    Raises:
      ValueError: an unknown axis name, a size that is not a positive int or -1, two
        -1 sizes, or sizes whose product does not divide / match the device count.
    """
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(
            f"mesh axes must be a non-empty mapping of axis name to size, got {axes!r}; "
            f"allowed names: {AXIS_NAMES}"
        )
    unknown = [name for name in axes if name not in AXIS_NAMES]
    if unknown:
        raise ValueError(
            f"unknown mesh axis name(s) {unknown} in {dict(axes)}; allowed: {AXIS_NAMES}"
        )
    for name, size in axes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"mesh axis {name!r} size must be an int, got {size!r}")
        if size != -1 and size < 1:
            raise ValueError(
                f"mesh axis {name!r} size must be >= 1 or -1 (the remaining devices), got {size}"
            )
    rest = [name for name, size in axes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {rest} in {dict(axes)}")

    devices = list(jax.devices() if devices is None else devices)
    num_devices = len(devices)
    fixed = math.prod(int(size) for size in axes.values() if size != -1)
    sizes = {name: int(size) for name, size in axes.items()}
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"cannot give axis {rest[0]!r} the rest of the devices: the fixed axes "
                f"{ {k: v for k, v in sizes.items() if v != -1} } need a multiple of {fixed} "
                f"devices, and {num_devices} devices is not divisible by {fixed}"
            )
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh axes {sizes} use {fixed} devices but {num_devices} are available; "
            "the product of the axis sizes must equal the device count (or give one axis -1)"
        )
    names = tuple(name for name in AXIS_NAMES if name in sizes)
    shape = tuple(sizes[name] for name in names)
    if axis_types is not None:
        axis_types = tuple(axis_types)
        if len(axis_types) != len(names):
            raise ValueError(
                f"axis_types has {len(axis_types)} entries but the mesh has axes {names}"
            )
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)


def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The mesh axes a batch (leading dimension) is split over, in mesh order.

    Every axis named in BATCH_AXIS_NAMES that the mesh has, 'expert' included (see the
    module docstring). Size-1 axes are kept: they shard nothing but keep specs uniform.
    """
    return tuple(name for name in mesh.axis_names if name in BATCH_AXIS_NAMES)


def num_batch_shards(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many distinct pieces a batch is cut into on this mesh."""
    return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def batch_spec(mesh: Mesh | jax.sharding.AbstractMesh) -> PartitionSpec:
    """PartitionSpec of an array whose leading dimension is the batch."""
    axes = batch_axes(mesh)
    return PartitionSpec(axes if axes else None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding of an array whose leading dimension is the batch (rest replicated)."""
    return NamedSharding(mesh, batch_spec(mesh))


def check_batch_divisible(batch_size: int, mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """Raises ValueError unless ``batch_size`` splits evenly over the batch axes.

    Returns the per-shard batch size.
    """
    shards = num_batch_shards(mesh)
    if batch_size % shards:
        detail = " x ".join(f"{name}({mesh.shape[name]})" for name in batch_axes(mesh))
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {shards} batch shards "
            f"{detail} of the mesh ({_mesh_shape_text(mesh)}); use a multiple of {shards}"
        )
    return batch_size // shards


def expert_axis_size(mesh: Mesh | jax.sharding.AbstractMesh | None) -> int:
    """Size of the 'expert' axis; 1 when there is no mesh or no such axis."""
    if mesh is None or getattr(mesh, "empty", False) or EXPERT_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[EXPERT_AXIS])


def check_experts_divisible(num_experts: int, mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """Raises ValueError unless the experts split evenly over the 'expert' axis.

    Returns the number of experts each device holds.
    """
    size = expert_axis_size(mesh)
    if num_experts % size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the 'expert' mesh axis size "
            f"{size} (mesh {_mesh_shape_text(mesh)}); use a multiple of {size} experts "
            "or a smaller 'expert' axis"
        )
    return num_experts // size


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by ``jax.set_mesh`` (abstract inside jit), or None outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh
