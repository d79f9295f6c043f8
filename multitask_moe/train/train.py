"""train_and_evaluate(config, workdir): the whole run, top to bottom.

    from multitask_moe.train import train_and_evaluate
    results = train_and_evaluate(config, "/tmp/run")   # config from configs/*.py

Reads as big_vision's train.py: config checks, mesh, shardings, steps compiled once with
explicit shardings, state created sharded (or restored from the workdir: a run always
resumes from its own checkpoints), the loop, and the final evaluation, plots and table.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import tensorflow as tf

from multitask_moe import parallel
from multitask_moe.train import evaluate as evaluate_lib
from multitask_moe.train import plots
from multitask_moe.train.checkpoint import Checkpoints
from multitask_moe.train.loop import train_loop
from multitask_moe.train.metrics import MetricWriter, TrainMeter, read_history
from multitask_moe.train.setup import ConfigError, Experiment, prepare
from multitask_moe.train.state import count_params, create_state

logger = logging.getLogger(__name__)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its checkpoints) and evaluates.

    Returns the final evaluation scalars (`eval/<task>/accuracy`, ..., and `test/...` when
    config.data.test_split is set); {} when the run stopped early on SIGTERM.
    Raises ConfigError (before writing anything) for a config that cannot run, and
    loop.NonFiniteLossError when the loss turns NaN/inf.
    """
    return run(prepare(config), workdir)


def run(experiment: Experiment, workdir: str) -> dict[str, float]:
    """Trains a prepared experiment in `workdir`; see train_and_evaluate.

    One Experiment (compiled once) can run in several workdirs, e.g. from a notebook.
    """
    with jax.set_mesh(experiment.mesh):
        return _run(experiment, workdir)


def _run(experiment: Experiment, workdir: str) -> dict[str, float]:
    config = experiment.config
    chief = jax.process_index() == 0
    mesh = experiment.mesh
    spec = experiment.model.spec
    batch_sharding = parallel.batch_sharding(mesh)
    task_names = experiment.task_names

    tf.io.gfile.makedirs(workdir)  # a local path or gs:// (shared by all hosts of a pod)
    if chief:
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    writer = MetricWriter(workdir, enabled=chief)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    try:
        train_step, eval_step = experiment.train_step, experiment.eval_step
        compile_seconds = experiment.compile_seconds
        start_step = checkpoints.latest_step()
        if start_step is None:
            start_step = 0
            state = create_state(spec, config.seed)
        else:
            if start_step > config.num_train_steps:
                raise ConfigError(
                    f"{checkpoints.directory} holds step {start_step}, past num_train_steps="
                    f"{config.num_train_steps}; raise num_train_steps or use a new --workdir"
                )
            state, saved = checkpoints.restore(start_step, spec.abstract)
            _check_resumable(saved, start_step, task_names, checkpoints.directory)
            if chief:
                print(f"Resuming from step {start_step} ({checkpoints.directory}).", flush=True)
        writer.truncate_after(start_step)
        if chief:
            print(
                f"{len(task_names)} tasks, {count_params(spec.abstract['params']):,} "
                f"parameters, mesh {dict(mesh.shape)}, train step compiled in "
                f"{compile_seconds:.1f}s.",
                flush=True,
            )
        writer.write(start_step, {"compile_seconds": compile_seconds})

        def evaluate(state, split: str = config.data.eval_split, prefix: str = "eval"):
            batches = experiment.mixture.eval_batches(split, batch_size=config.eval_batch_size)
            return evaluate_lib.evaluate(
                eval_step, state, batches, batch_sharding, task_names, spec.sparse_layers, prefix
            )

        local_batches = experiment.mixture.iterator(
            "train", batch_size=config.batch_size, seed=config.seed, start_step=start_step
        )
        batches = (
            evaluate_lib.global_batch(batch, evaluate_lib.TRAIN_KEYS, batch_sharding)
            for batch in local_batches
        )

        def progress(step: int) -> dict:
            # The iterator serves one batch per step, so its position is the step.
            return {
                "step": step,
                "data_step": step,
                "task_names": list(task_names),
                "mesh": {name: int(size) for name, size in mesh.shape.items()},
            }

        result = train_loop(
            state=state,
            start_step=start_step,
            num_steps=config.num_train_steps,
            batches=batches,
            train_step=train_step,
            evaluate=lambda state: evaluate(state)[0],
            checkpoints=checkpoints,
            writer=writer,
            meter=TrainMeter(task_names, spec.sparse_layers),
            progress=progress,
            config=config,
            show_progress=chief and config.progress_bar,
        )
        if result.preempted:
            return {}
        if start_step == config.num_train_steps:
            checkpoints.save(start_step, result.state, progress(start_step))
        final, routing = evaluate(result.state)
        splits = {"eval": final}
        if config.data.test_split:
            test, _ = evaluate(result.state, config.data.test_split, "test")
            final = {**final, **test}
            splits["test"] = test
        writer.write(result.step, final)
        if chief:
            _report(experiment, workdir, splits, routing)
        return final
    finally:
        checkpoints.close()
        writer.close()


def _check_resumable(saved: dict, step: int, task_names, directory: str) -> None:
    if saved.get("data_step") != step:
        raise ConfigError(
            f"checkpoint {step} in {directory} records data position "
            f"{saved.get('data_step')}; cannot resume exactly"
        )
    if list(saved.get("task_names", [])) != list(task_names):
        raise ConfigError(
            f"checkpoint {step} in {directory} was trained on tasks {saved.get('task_names')}, "
            f"but the config has {list(task_names)}; use a new --workdir"
        )


def _report(experiment: Experiment, workdir: str, splits, routing) -> None:
    """Plots and the per-task table (process 0)."""
    task_names = experiment.task_names
    written = []
    if experiment.config.write_plots:
        plot_dir = os.path.join(workdir, "plots")
        written.append(
            plots.learning_curves(
                read_history(workdir), task_names, os.path.join(plot_dir, "learning_curves.png")
            )
        )
        for layer, counts in routing.items():
            name = layer.replace("/", "_")
            written.append(
                plots.routing_heatmap(
                    counts, task_names, layer, os.path.join(plot_dir, f"routing_{name}.png")
                )
            )
    table = evaluate_lib.results_table(
        task_names, experiment.task_num_classes, experiment.task_modalities, splits
    )
    with tf.io.gfile.GFile(os.path.join(workdir, "results.txt"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + "\n", flush=True)
    if written:
        print(f"Plots: {os.path.dirname(written[0])}/ ({len(written)} PNG files)", flush=True)
    print(
        f"Metrics: {os.path.join(workdir, 'metrics.jsonl')}\n"
        f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
        flush=True,
    )
