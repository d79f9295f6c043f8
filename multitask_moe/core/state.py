"""Train state: creation sharded over the mesh, its abstract form, and the optimizer.

The state is a plain pytree,
    {"step": int32 [], "params": nnx.State, "model_state": nnx.State, "opt_state": ...},
so jit, Orbax and optax all see the same thing. It is created by a jitted init whose
out_shardings come from an abstract evaluation under the mesh: each parameter is born on
the devices that own it (expert weights split over 'expert'), and no full copy ever
exists on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from multitask_moe.core.step import weight_decay_mask


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip_norm: float = 1.0,
    learning_rate_in_state: bool = False,
) -> optax.GradientTransformation:
    """The optimizer of every run and every evolution child: AdamW (decay on matrices
    only, weight_decay_mask) after global-norm clipping (none for grad_clip_norm <= 0).

    learning_rate_in_state=True keeps the learning rate (and Adam's other numbers) in the
    optimizer state (optax.inject_hyperparams): each evolution child sets its own rate
    there (with_learning_rate) and one compiled step serves every child of an
    architecture. The decay mask is a static argument: inject_hyperparams would take a
    callable for a schedule and call it with the step count (a mask of False: no decay).
    """
    make = (
        optax.inject_hyperparams(optax.adamw, static_args=("mask",))
        if learning_rate_in_state
        else optax.adamw
    )
    decayed = make(
        learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask
    )
    clip = optax.clip_by_global_norm(grad_clip_norm) if grad_clip_norm > 0 else optax.identity()
    return optax.chain(clip, decayed)


def with_learning_rate(opt_state, learning_rate: float):
    """opt_state of adamw(learning_rate_in_state=True) with its learning rate replaced."""
    clip, decayed = opt_state
    hyperparams = dict(decayed.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
    return clip, decayed._replace(hyperparams=hyperparams)


def make_optimizer(
    opt_config: ml_collections.ConfigDict, num_train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """A run's adamw with linear warmup and cosine decay, and that schedule."""
    warmup = min(opt_config.warmup_steps, max(num_train_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt_config.learning_rate,
        warmup_steps=warmup,
        # optax needs decay_steps > warmup_steps even for a 0- or 1-step run.
        decay_steps=max(num_train_steps, warmup + 1),
        end_value=opt_config.learning_rate * opt_config.end_learning_rate_factor,
    )
    tx = adamw(
        schedule,
        weight_decay=opt_config.weight_decay,
        b1=opt_config.b1,
        b2=opt_config.b2,
        grad_clip_norm=opt_config.grad_clip_norm,
    )
    return tx, schedule


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What the loop needs to create, restore and step the state on one mesh."""

    graphdef: nnx.GraphDef
    init: Callable[[jax.Array], dict]  # key -> state (jit it with out_shardings)
    abstract: dict  # ShapeDtypeStructs of the state, with shardings on `mesh`
    shardings: dict  # NamedShardings on `mesh`, one per leaf
    sparse_layers: tuple[str, ...]


def state_spec(
    create_model: Callable[[nnx.Rngs], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> StateSpec:
    """Abstract state and shardings of `create_model` + `tx` on `mesh`.

    Must be called under `jax.set_mesh(mesh)`: the layers read the mesh at construction
    to place their weights (experts over 'expert').
    """

    def init(key: jax.Array) -> dict:
        model = create_model(nnx.Rngs(key))
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": model_state,
            "opt_state": tx.init(params),
        }

    abstract_model = nnx.eval_shape(lambda: create_model(nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract = jax.eval_shape(lambda: init(jax.random.key(0)))  # no concrete key: the mesh
    # may be an AbstractMesh (shape checks of a pod config on this machine).
    shardings = jax.tree.map(lambda leaf: concrete_sharding(leaf, mesh), abstract)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
    return StateSpec(
        graphdef=graphdef,
        init=init,
        abstract=abstract,
        shardings=shardings,
        sparse_layers=tuple(abstract_model.sparse_layer_names()),
    )


def concrete_sharding(leaf: jax.ShapeDtypeStruct, mesh: Mesh) -> NamedSharding:
    """The sharding abstract evaluation gave `leaf`, bound to the devices of `mesh`.

    With Explicit mesh axes every abstract array carries its sharding, except constant
    scalars (e.g. a step counter born as jnp.zeros(())), which have nothing to shard and
    are replicated. A larger array without one is a bug in how the mesh was set, not
    something to paper over with replication.
    """
    sharding = getattr(leaf, "sharding", None)
    if sharding is None and leaf.ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"abstract state leaf {leaf} has no NamedSharding; build the state under "
            "jax.set_mesh(mesh) with Explicit mesh axes"
        )
    return NamedSharding(mesh, sharding.spec)


def create_state(spec: StateSpec, seed: int) -> dict:
    """The initial state, created sharded by a jit with out_shardings."""
    return jax.jit(spec.init, out_shardings=spec.shardings)(jax.random.key(seed))


def count_params(abstract_params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(abstract_params))
