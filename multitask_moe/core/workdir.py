"""A trained model on disk: its config.json and its latest checkpoint, restored.

A training workdir and an extracted model directory have the same layout (config.json,
checkpoints/<step>/), so both restore with the same code onto any mesh: the model is
rebuilt from its config (tasks and per-layer expert counts included) and the checkpoint
restored onto that model's shardings.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import tensorflow as tf

from multitask_moe.core import build
from multitask_moe.core.build import Experiment
from multitask_moe.core.checkpoint import Checkpoints
from multitask_moe.core.config_lib import CONFIG_FILE, read_config
from multitask_moe.errors import ConfigError, one_line


class WorkdirError(ConfigError):
    """A directory that holds no restorable model; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A model restored from a directory: its experiment (core/build.py: no warm start,
    no train step; the eval step compiled) and its latest state, on experiment.mesh."""

    directory: str
    experiment: Experiment
    state: dict
    step: int
    progress: dict


def load_config(directory: str) -> ml_collections.ConfigDict:
    """The config a run (or an extraction) wrote to `directory`."""
    config = read_config(directory)
    if config is None:
        raise WorkdirError(f"{directory} has no {CONFIG_FILE}: not a training workdir or model")
    return config


def restore(
    directory: str,
    config: ml_collections.ConfigDict | None = None,
    *,
    mesh: dict[str, int] | None = None,
    compile_eval: bool = True,
) -> Restored:
    """Restores the latest checkpoint of `directory` (config: its config.json by default;
    mesh: axis sizes replacing config.mesh, e.g. {"data": 8, "expert": 1}; compile_eval:
    False when only the state is wanted)."""
    config = load_config(directory) if config is None else config
    checkpoint_dir = os.path.join(directory, "checkpoints")
    if not tf.io.gfile.isdir(checkpoint_dir):
        raise WorkdirError(f"{directory} holds no checkpoint (no {checkpoint_dir})")
    config = config.copy_and_resolve_references()
    if mesh is not None:
        config.mesh = ml_collections.ConfigDict(dict(mesh))
    # Built without the warm-start planner: a warm-started run restores from its own
    # checkpoint, and its source need not exist any more.
    experiment = build.experiment(build.resolve(config), compile_eval=compile_eval)
    checkpoints = Checkpoints(checkpoint_dir, keep=config.keep_checkpoints, enable_async=False)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise WorkdirError(f"{directory} holds no checkpoint ({checkpoint_dir} is empty)")
        with jax.set_mesh(experiment.mesh):
            checkpoints.check_shapes(step, experiment.model.spec.abstract)
            try:
                state, progress = checkpoints.restore(step, experiment.model.spec.abstract)
            except Exception as error:  # noqa: BLE001 -- tensorstore, JSON, I/O errors
                # Reading never moves anything: a training run of this workdir does that.
                reason = one_line(error, limit=200)
                raise WorkdirError(
                    f"checkpoint step {step} in {checkpoint_dir} is unreadable ({reason})"
                ) from None
    finally:
        checkpoints.close()
    saved_tasks = progress.get("task_names")
    if saved_tasks is not None and list(saved_tasks) != list(experiment.task_names):
        raise ConfigError(
            f"checkpoint {step} in {directory} holds tasks {saved_tasks}, its config "
            f"{list(experiment.task_names)}"
        )
    return Restored(directory, experiment, state, step, progress)
