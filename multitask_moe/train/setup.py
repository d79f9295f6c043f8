"""Everything a training run needs that follows from its config, checked before anything
is written: core/build.py's experiment, plus the warm start and the compiled train step.

`prepare(config)` validates the config, builds the mesh, the task mixture and the
abstract train state, plans a warm start from config.init_from, compiles the steps, and
raises ConfigError (one clear line) on any problem, before the workdir is touched: a bad
config leaves no half-made run behind.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import ml_collections

from multitask_moe import models, parallel
from multitask_moe.core import build as build_lib
from multitask_moe.core.step import TRAIN_KEYS
from multitask_moe.errors import ConfigError, check_int, one_line
from multitask_moe.train import nearest, warm_start


@dataclasses.dataclass(frozen=True)
class Prepared(build_lib.Experiment):
    """An experiment ready to train: its compiled train step and its warm start."""

    train_step: Callable | None  # compiled: (state, batch) -> (state, metrics)
    compile_seconds: float  # of the train step
    warm_start: warm_start.Source | None = None  # the run it starts from (init_from)


def check_warm_start_settings(config: ml_collections.ConfigDict) -> None:
    """The settings only a warm start reads (freeze, nearest_examples)."""
    if config.freeze not in models.FREEZE_MODES:
        raise ConfigError(
            f"freeze={config.freeze!r} is not allowed; allowed: {models.FREEZE_MODES}"
        )
    check_int(config.nearest_examples, "nearest_examples", 2 * nearest.FOLDS, error=ConfigError)


def check(config: ml_collections.ConfigDict) -> None:
    """The checks that need no device and no dataset (a run makes them before it claims
    its workdir; `prepare` makes them again with the rest)."""
    config = config.copy_and_resolve_references()
    build_lib.check_numbers(config)
    check_warm_start_settings(config)


def prepare(
    config: ml_collections.ConfigDict, *, compile_train: bool = True, compile_eval: bool = True
) -> Prepared:
    """Validates `config`, resolves mesh, data, warm start and state, compiles the steps.

    Writes nothing; every problem with the config raises ConfigError. compile_train=False
    or compile_eval=False leaves that step None (checking a warm start's plan only).
    """
    resolved = build_lib.resolve(config)
    config = resolved.config
    check_warm_start_settings(config)
    try:
        plan = warm_start.plan(config, list(resolved.task_weights))
    except (KeyError, ValueError, OSError) as error:
        raise ConfigError(one_line(error)) from None
    source, trainable_of = None, None
    if plan is not None:
        # The source model's input layout, so that the position embeddings match.
        config.data.min_tokens, config.data.min_token_width = plan.token_shape
        try:
            source = _source_model(plan, resolved.mesh)
        except ValueError as error:
            raise ConfigError(f"model: {one_line(error)}") from None
        if config.freeze != "none":

            def trainable_of(spec):
                return warm_start.trainable(spec, source.spec, plan, config.freeze)

    experiment = build_lib.experiment(
        resolved, trainable_of=trainable_of, compile_eval=compile_eval
    )
    if plan is not None and experiment.token_shape != plan.token_shape:
        raise ConfigError(
            f"init_from={config.init_from!r} was built for inputs of {plan.token_shape[0]} "
            f"tokens x {plan.token_shape[1]} features, the new tasks need "
            f"{experiment.token_shape[0]} x {experiment.token_shape[1]}: warm start needs "
            "tasks that fit the source's input layout"
        )
    model, mesh = experiment.model, experiment.mesh
    train_step, compile_seconds = None, 0.0
    if compile_train:
        batch = build_lib.abstract_batch(
            config.batch_size, experiment.token_shape, TRAIN_KEYS, parallel.batch_sharding(mesh)
        )
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            # Donating the state lets XLA update parameters and optimizer state in place.
            train_step = (
                jax.jit(
                    model.train_fn, out_shardings=(model.spec.shardings, None), donate_argnums=0
                )
                .lower(model.spec.abstract, batch)
                .compile()
            )
            compile_seconds = time.perf_counter() - start
    return Prepared(
        **{field.name: getattr(experiment, field.name) for field in dataclasses.fields(experiment)},
        train_step=train_step,
        compile_seconds=compile_seconds,
        warm_start=None if plan is None else warm_start.Source(plan, source.spec),
    )


def _source_model(plan: warm_start.Plan, mesh) -> build_lib.Model:
    """The abstract model of a warm start's source run, on this run's mesh."""
    tasks = plan.seen_tasks
    return build_lib.build(
        plan.config.copy_and_resolve_references(),
        mesh,
        [task.name for task in tasks],
        [task.num_classes for task in tasks],
        [task.modality for task in tasks],
        plan.token_shape,
    )
