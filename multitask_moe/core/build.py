"""A model from its config: every check of a config, the mesh, the task mixture, the
abstract train state and the compiled eval step, with nothing written.

    experiment = build.experiment(build.resolve(config))   # what a restore needs
    model = build.build(config, mesh, names, classes, modalities, token_shape)

Training (train/setup.py) adds the warm start and the compiled train step on top; a
restore (core/workdir.py), extraction and evaluation use this alone, so they never meet
the warm-start planner.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from multitask_moe import data, models, parallel
from multitask_moe.core import config_lib
from multitask_moe.core.state import StateSpec, make_optimizer, state_spec
from multitask_moe.core.step import (
    AUX_LOSSES,
    EVAL_KEYS,
    TASK_WEIGHTINGS,
    LossSettings,
    make_eval_step,
    make_train_step,
)
from multitask_moe.errors import ConfigError, check_int, one_line


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The resolved pieces of a config: mesh, data, abstract model, eval step; no state."""

    config: ml_collections.ConfigDict  # resolved (e.g. the routing group size filled in)
    mesh: jax.sharding.Mesh
    mixture: data.Mixture
    task_names: tuple[str, ...]
    task_num_classes: tuple[int, ...]
    task_modalities: tuple[str, ...]
    token_shape: tuple[int, int]
    model: Model
    eval_step: Callable | None  # compiled: (state, batch) -> per-task sums


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Step counts, intervals and sizes."""
    for name, minimum in (
        ("num_train_steps", 0),
        ("batch_size", 1),
        ("eval_batch_size", 1),
        ("log_every_steps", 1),
        ("eval_every_steps", 0),
        ("checkpoint_every_steps", 0),
        ("keep_checkpoints", 1),
        ("profile_steps", 0),
        ("seed", 0),
        ("optimizer.warmup_steps", 0),
        ("model.d_model", 1),
        ("model.depth", 1),
        ("model.num_heads", 1),
        ("model.mlp_dim", 1),
    ):
        value = config
        for part in name.split("."):  # "optimizer.warmup_steps" -> config.optimizer...
            value = value[part]
        check_int(value, name, minimum, error=ConfigError)
    if not config.optimizer.learning_rate > 0:
        raise ConfigError(f"optimizer.learning_rate={config.optimizer.learning_rate} must be > 0")
    for name in AUX_LOSSES:
        if config.aux_loss[name] < 0:
            raise ConfigError(f"aux_loss.{name}={config.aux_loss[name]} must be >= 0")
    if config.task_weighting not in TASK_WEIGHTINGS:
        raise ConfigError(
            f"task_weighting={config.task_weighting!r} is not allowed; allowed: {TASK_WEIGHTINGS}"
        )


def task_weights_of(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The mixture's task -> weight, each task known to the data registry."""
    try:
        weights, _ = config_lib.parse_tasks(config.data.tasks)
    except ValueError as error:
        raise ConfigError(one_line(error)) from None
    if not weights:
        raise ConfigError("data.tasks is empty; give 'name=weight, ...' (e.g. 'digits/class=1')")
    for name, weight in weights.items():
        try:
            data.get_task(name, data_dir=config.data.data_dir)
        except (KeyError, ValueError, OSError) as error:
            raise ConfigError(f"data.tasks: {one_line(error)}") from None
        if weight < 0 or not math.isfinite(weight):
            raise ConfigError(f"data.tasks: weight of {name!r} is {weight}; must be >= 0")
    if not any(weight > 0 for weight in weights.values()):
        raise ConfigError(f"data.tasks={config.data.tasks!r}: at least one weight must be > 0")
    return weights


def loss_task_weights(config, task_names) -> tuple[float, ...]:
    weights = config_lib.parse_weights(config.task_weights, "task_weights")
    unknown = sorted(set(weights) - set(task_names))
    if unknown:
        raise ConfigError(
            f"task_weights names {unknown}, which are not in data.tasks; "
            f"allowed: {list(task_names)}"
        )
    if any(weight < 0 for weight in weights.values()):
        raise ConfigError(f"task_weights={config.task_weights!r}: weights must be >= 0")
    return tuple(weights.get(name, 1.0) for name in task_names)


def check_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of config.mesh, and the batch / expert divisibility it implies."""
    try:
        mesh = parallel.make_mesh(dict(config.mesh.to_dict()))
        parallel.check_batch_divisible(config.batch_size, mesh)
        parallel.check_batch_divisible(config.eval_batch_size, mesh)
        if config.model.moe_every:
            parallel.check_experts_divisible(config.model.moe.num_experts, mesh)
        if config.model.moa_every:
            parallel.check_experts_divisible(config.model.moa.num_experts, mesh)
    except ValueError as error:
        hint = ""
        if config.num_cpu_devices and jax.device_count() != config.num_cpu_devices:
            hint = (
                f" (config.num_cpu_devices={config.num_cpu_devices} only takes effect "
                "before JAX starts: the command line applies it; in a notebook, run "
                f"jax.config.update('jax_num_cpu_devices', {config.num_cpu_devices}) "
                "before anything else touches JAX)"
            )
        raise ConfigError(one_line(error) + hint) from None
    if (
        config.model.moe_every
        and config.model.moe.get("exchange") == "ragged"
        and parallel.expert_axis_size(mesh) > 1
        and jax.default_backend() == "cpu"
    ):
        raise ConfigError(
            "model.moe.exchange='ragged' needs a GPU or TPU backend (XLA has no ragged "
            "all-to-all on CPU); use 'ring' or 'auto' here"
        )
    processes = jax.process_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % processes:
            raise ConfigError(
                f"{name}={config[name]} must be divisible by the number of processes ({processes})"
            )
    return mesh


def routing_group_size(config: ml_collections.ConfigDict, mesh, num_tokens: int) -> int | None:
    """The MoE routing group for model.moe.group_size=None: one group per device's share of
    a batch (None when the model has no MoE block or the config sets the size itself).

    Capacity is counted per routing group, and under a mesh a group may not straddle
    devices; the largest group that divides both the train and the eval share of every
    device is gcd(train, eval) examples' worth of `num_tokens` tokens.
    """
    if not config.model.moe_every or config.model.moe.group_size is not None:
        return None
    shards = parallel.num_batch_shards(mesh)
    examples = math.gcd(config.batch_size // shards, config.eval_batch_size // shards)
    return examples * num_tokens


@dataclasses.dataclass(frozen=True)
class Model:
    """The abstract state of a config and its step functions (nothing allocated)."""

    spec: StateSpec
    train_fn: Callable[[dict, dict], tuple[dict, dict]]
    eval_fn: Callable[[dict, dict], dict]
    trainable: Any = None  # {"params", "model_state"} masks (models.trainable_mask), or None


def build(
    config: ml_collections.ConfigDict,
    mesh,
    task_names: Sequence[str],
    task_num_classes: Sequence[int],
    task_modalities: Sequence[str],
    token_shape: tuple[int, int],
    trainable_of: Callable[[StateSpec], Any] | None = None,
) -> Model:
    """The abstract state and the step functions on `mesh` (a Mesh, or an AbstractMesh to
    check shapes of a config for hardware that is not here). trainable_of(spec): the
    masks of the parameters that train (None: all)."""

    group_size = routing_group_size(config, mesh, token_shape[0])

    def create_model(rngs):
        return models.model_from_config(
            config.model,
            task_num_classes=task_num_classes,
            task_modalities=task_modalities,
            token_shape=tuple(token_shape),
            rngs=rngs,
            group_size=group_size,
            task_uncertainty=config.task_weighting == "uncertainty",
        )

    with _use_mesh(mesh):
        tx, schedule = make_optimizer(config.optimizer, config.num_train_steps)
        spec = state_spec(create_model, tx, mesh)
    loss_settings = LossSettings(
        num_tasks=len(task_names),
        task_weights=loss_task_weights(config, task_names),
        aux_weights={name: float(config.aux_loss[name]) for name in AUX_LOSSES},
        sparse_layers=spec.sparse_layers,
        task_weighting=config.task_weighting,
    )
    trainable = None if trainable_of is None else trainable_of(spec)
    train_fn = make_train_step(
        spec.graphdef, tx, schedule, loss_settings, skip_nonfinite=config.skip_nonfinite_updates
    )
    if trainable is not None:  # bound as numpy constants: whole frozen leaves cost nothing
        train_fn = functools.partial(train_fn, trainable=trainable)
    eval_fn = make_eval_step(spec.graphdef, len(task_names), spec.sparse_layers)
    return Model(spec=spec, train_fn=train_fn, eval_fn=eval_fn, trainable=trainable)


def abstract_batch(
    size: int, token_shape: tuple[int, int], keys: Sequence[str], sharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global batch: inputs [B, L, P] f32, mask [B, L], label / task_id /
    valid [B], each sharded over the batch axes."""
    length, features = token_shape
    shapes = {
        "inputs": ((size, length, features), jnp.float32),
        "mask": ((size, length), jnp.bool_),
        "label": ((size,), jnp.int32),
        "task_id": ((size,), jnp.int32),
        "valid": ((size,), jnp.bool_),
    }
    return {key: jax.ShapeDtypeStruct(*shapes[key], sharding=sharding) for key in keys}


def mixture(
    config: ml_collections.ConfigDict, weights: dict[str, float] | None = None
) -> data.Mixture:
    """The task mixture of `config` (ConfigError for tasks or settings it cannot build)."""
    weights = task_weights_of(config) if weights is None else weights
    try:
        return data.Mixture(
            weights,
            rate=config.data.rate,
            cap=config.data.cap,
            temperature=config.data.temperature,
            image_size=config.data.image_size,
            patch_size=config.data.patch_size,
            data_dir=config.data.data_dir,
            min_token_shape=(config.data.min_tokens, config.data.min_token_width),
            train_examples=config_lib.parse_tasks(config.data.tasks)[1],
            subset_seed=config.seed,
            order=config.data.order,
        )
    except (KeyError, ValueError, OSError) as error:
        raise ConfigError(f"data: {one_line(error)}") from None


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A checked config with its mesh and task weights: what building starts from."""

    config: ml_collections.ConfigDict  # resolved (references filled in), checked
    mesh: jax.sharding.Mesh
    task_weights: dict[str, float]  # data.tasks parsed, every task known to the registry


def resolve(config: ml_collections.ConfigDict) -> Resolved:
    """Every check short of building, cheapest first: numbers, then the mesh, then the
    tasks (which open datasets). ConfigError (one line) for any problem."""
    config = config.copy_and_resolve_references()
    check_numbers(config)
    mesh = check_mesh(config)
    return Resolved(config, mesh, task_weights_of(config))


def experiment(
    resolved: Resolved,
    *,
    trainable_of: Callable[[StateSpec], Any] | None = None,
    compile_eval: bool = True,
) -> Experiment:
    """The data, abstract state and (unless compile_eval=False) compiled eval step of a
    resolved config; ConfigError (one line) for a model it cannot build; writes nothing.
    trainable_of: as for `build`.
    """
    config, mesh = resolved.config, resolved.mesh
    mixture_ = mixture(config, resolved.task_weights)
    tasks = mixture_.tasks
    token_shape = tuple(int(n) for n in mixture_.token_shape)
    try:
        model = build(
            config,
            mesh,
            [task.name for task in tasks],
            [task.num_classes for task in tasks],
            [task.modality for task in tasks],
            token_shape,
            trainable_of=trainable_of,
        )
    except ValueError as error:
        # The layer constructors name the bad argument (routing, top_k, dims, dtype, ...).
        raise ConfigError(f"model: {one_line(error)}") from None
    eval_step = None
    if compile_eval:
        batch = abstract_batch(
            config.eval_batch_size, token_shape, EVAL_KEYS, parallel.batch_sharding(mesh)
        )
        with jax.set_mesh(mesh):
            eval_step = jax.jit(model.eval_fn).lower(model.spec.abstract, batch).compile()
    return Experiment(
        config=config,
        mesh=mesh,
        mixture=mixture_,
        task_names=tuple(task.name for task in tasks),
        task_num_classes=tuple(int(task.num_classes) for task in tasks),
        task_modalities=tuple(task.modality for task in tasks),
        token_shape=token_shape,
        model=model,
        eval_step=eval_step,
    )


def _use_mesh(mesh):
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return jax.sharding.use_abstract_mesh(mesh)
    return jax.set_mesh(mesh)
