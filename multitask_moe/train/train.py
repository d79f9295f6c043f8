"""train_and_evaluate(config, workdir): the whole run, top to bottom.

    from multitask_moe.train import train_and_evaluate
    results = train_and_evaluate(config, "/tmp/run")   # config from configs/*.py

Reads as big_vision's train.py: config checks, mesh, shardings, steps compiled once with
explicit shardings, state created sharded (or restored from the workdir: a run always
resumes from its own checkpoints), the loop, and the final evaluation, plots and table.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from flax import nnx
from tqdm import tqdm

from multitask_moe import parallel
from multitask_moe.core import config_lib, files, runtime
from multitask_moe.core import evaluate as evaluate_lib
from multitask_moe.core.checkpoint import Checkpoints, CheckpointShapeError
from multitask_moe.core.run_lock import claim
from multitask_moe.core.state import count_params, create_state
from multitask_moe.core.step import TRAIN_KEYS
from multitask_moe.errors import ConfigError
from multitask_moe.train import loop, plots, warm_start
from multitask_moe.train.metrics import MetricWriter, TrainMeter, read_history
from multitask_moe.train.setup import Prepared, check, prepare


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its checkpoints) and evaluates.

    Returns the final evaluation scalars (`eval/<task>/accuracy`, ..., and `test/...` when
    config.data.test_split is set); {} when the run stopped early on SIGTERM.
    Raises ConfigError (before writing anything) for a config that cannot run, and
    loop.NonFiniteLossError when the loss turns NaN/inf.
    """
    # The workdir is taken before anything is built: a start refused for a live run there
    # costs the config check, not the datasets and compiles of `prepare`.
    check(config)
    with claim(workdir):
        return _run(prepare(config), workdir)


def run(experiment: Prepared, workdir: str) -> dict[str, float]:
    """Trains a prepared experiment in `workdir`; see train_and_evaluate.

    One Prepared experiment (compiled once) can run in several workdirs, e.g. from a notebook.
    """
    with claim(workdir):
        return _run(experiment, workdir)


def _run(experiment: Prepared, workdir: str) -> dict[str, float]:
    with jax.set_mesh(experiment.mesh):
        return _run_locked(experiment, workdir)


def _run_locked(experiment: Prepared, workdir: str) -> dict[str, float]:
    config, spec = experiment.config, experiment.model.spec
    chief = jax.process_index() == 0
    checkpoints = Checkpoints(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, writer=True
    )
    writer = None
    try:
        # Restored (or refused) before config.json is replaced, so a refused resume can
        # name what changed from the config that wrote the checkpoint.
        state, start_step = _initial_state(experiment, checkpoints, workdir)
        if chief:
            files.write_config(workdir, config)
        writer = MetricWriter(workdir, enabled=chief)
        writer.truncate_after(start_step)
        _announce(experiment, writer, start_step)
        evaluate = functools.partial(_evaluate, experiment)
        batches = _train_batches(experiment, start_step)
        progress = functools.partial(_progress, experiment, batches)
        bar = tqdm(
            total=config.num_train_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (chief and config.progress_bar),
            mininterval=1.0,
            dynamic_ncols=True,
        )
        meter, times = TrainMeter(experiment.task_names, spec.sparse_layers), loop.StepTimes()
        throughput = loop.Throughput(start_step)
        actions = [
            loop.Log(
                config.log_every_steps,
                meter,
                writer,
                throughput,
                batch_size=config.batch_size,
                bar=bar,
                times=times,
            ),
            loop.Evaluate(
                config.eval_every_steps, lambda state: evaluate(state)[0], writer, throughput
            ),
            loop.Checkpoint(config.checkpoint_every_steps, checkpoints, progress),
        ]
        profile = None
        if config.profile_steps:
            profile = loop.Profile(
                start_step + 1, config.profile_steps, os.path.join(workdir, "tensorboard")
            )
            actions.append(profile)
        result = loop.train_loop(
            state,
            range(start_step + 1, config.num_train_steps + 1),
            batches,
            experiment.train_step,
            loop.PendingMetrics(meter, checkpoints, skip_nonfinite=config.skip_nonfinite_updates),
            actions,
            bar,
            times,
        )
        if chief and result.step > start_step:
            print(times.summary(), flush=True)
            if profile is not None:
                print(_profile_line(profile, workdir), flush=True)
        if result.preempted:
            if chief:
                print(
                    f"\nSIGTERM: saved a checkpoint at step {result.step} in "
                    f"{checkpoints.directory}; run the same command again to resume.",
                    flush=True,
                )
            return {}
        if start_step == config.num_train_steps:
            checkpoints.save(start_step, result.state, progress(start_step))
        return _finish(experiment, workdir, writer, result, evaluate)
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()


def _announce(experiment: Prepared, writer: MetricWriter, start_step: int) -> None:
    """The run's size and compile time, on the console (process 0) and in the metrics."""
    if jax.process_index() == 0:
        print(
            f"{len(experiment.task_names)} tasks, "
            f"{count_params(experiment.model.spec.abstract['params']):,} parameters, mesh "
            f"{dict(experiment.mesh.shape)}, train step compiled in "
            f"{experiment.compile_seconds:.1f}s.",
            flush=True,
        )
    writer.write(start_step, {"compile_seconds": experiment.compile_seconds})


def _evaluate(experiment: Prepared, state, split: str | None = None, prefix: str = "eval"):
    """(`<prefix>/...` scalars, routing counts) over every example of `split` (default:
    the config's eval split)."""
    config = experiment.config
    batches = experiment.mixture.eval_batches(
        split or config.data.eval_split, batch_size=config.eval_batch_size
    )
    return evaluate_lib.evaluate(
        experiment.eval_step,
        state,
        batches,
        parallel.batch_sharding(experiment.mesh),
        experiment.task_names,
        experiment.model.spec.sparse_layers,
        prefix,
        warm_start.task_groups(experiment),
    )


def _train_batches(experiment: Prepared, start_step: int) -> loop.Batches:
    """Global train batches from step `start_step` on, counting what they have served."""
    config, sharding = experiment.config, parallel.batch_sharding(experiment.mesh)
    local = experiment.mixture.iterator(
        "train", batch_size=config.batch_size, seed=config.seed, start_step=start_step
    )
    return loop.Batches(
        (evaluate_lib.global_batch(batch, TRAIN_KEYS, sharding) for batch in local),
        position=start_step,
    )


def _progress(experiment: Prepared, batches: loop.Batches, step: int) -> dict:
    """What a checkpoint at `step` records beside the state, to resume exactly."""
    return {
        "step": step,
        "data_step": batches.position,
        "data": _data_settings(experiment.config),
        "task_names": list(experiment.task_names),
        "mesh": {name: int(size) for name, size in experiment.mesh.shape.items()},
    }


def _finish(experiment: Prepared, workdir: str, writer, result, evaluate) -> dict[str, float]:
    """The final evaluation (and test split), written; the plots and table (process 0)."""
    config = experiment.config
    final, routing = evaluate(result.state)
    splits = {"eval": final}
    if config.data.test_split:
        test, _ = evaluate(result.state, config.data.test_split, "test")
        final = {**final, **test}
        splits["test"] = test
    writer.write(result.step, final)
    if jax.process_index() == 0:
        usage = usage_tables(experiment.model.spec, result.state)
        _report(experiment, workdir, splits, routing, usage)
    return final


def _profile_line(profile: loop.Profile, workdir: str) -> str:
    if not profile.traced:
        return (
            "Profile: none written; the run had too few steps left after the "
            f"{profile.warmup} warm-up steps."
        )
    return (
        f"Profile: {profile.traced} steps traced in {profile.directory} "
        f"(tensorboard --logdir {os.path.join(workdir, 'tensorboard')}, Profile tab)."
    )


def _data_settings(config: ml_collections.ConfigDict) -> dict:
    """The settings that fix the train batch of every step (not where the files live)."""
    data = config.data
    return {
        "tasks": data.tasks,
        "rate": data.rate,
        "temperature": data.temperature,
        "cap": data.cap,
        "image_size": data.image_size,
        "patch_size": data.patch_size,
        "min_token_shape": [data.min_tokens, data.min_token_width],
        "batch_size": config.batch_size,
        "seed": config.seed,
        "order": data.order,
        # The process order shards and shuffles per process: its batches hang on the count.
        "process_count": jax.process_count() if data.order == "process" else "any",
    }


def _initial_state(
    experiment: Prepared, checkpoints: Checkpoints, workdir: str
) -> tuple[dict, int]:
    """(state, step): the workdir's latest checkpoint, or at step 0 a fresh state or the
    warm start from config.init_from (a run always resumes from its own checkpoints)."""
    config, spec = experiment.config, experiment.model.spec
    step = checkpoints.latest_step()
    if step is not None and step > config.num_train_steps:
        raise ConfigError(
            f"{checkpoints.directory} holds step {step}, past num_train_steps="
            f"{config.num_train_steps}; raise num_train_steps or use a new --workdir"
        )
    try:
        restored = checkpoints.restore_latest_readable(spec.abstract, runtime.warn)
    except CheckpointShapeError as error:
        raise ConfigError(f"{error}; {_config_changes(workdir, config)}") from None
    if restored is None and experiment.warm_start is not None:
        return warm_start.initial_state(experiment, workdir), 0
    if restored is None:
        return create_state(spec, config.seed), 0
    step, state, saved = restored
    _check_resumable(saved, step, experiment, checkpoints.directory)
    if jax.process_index() == 0:
        print(f"Resuming from step {step} ({checkpoints.directory}).", flush=True)
    return state, step


def _config_changes(workdir: str, config: ml_collections.ConfigDict) -> str:
    """What differs between the config that wrote the workdir and `config`, in words."""
    before = config_lib.read_config(workdir)
    if before is None:
        return "the workdir has no config.json to compare with; use a new --workdir"
    changed = config_lib.changed_fields(before, config)
    if not changed:
        return "config.json shows no changed field; use a new --workdir"
    return f"the config changed {', '.join(changed)}; use a new --workdir or the old config"


def _check_resumable(saved: dict, step: int, experiment: Prepared, directory: str) -> None:
    """ConfigError unless resuming `saved` (a checkpoint's progress) continues the run
    exactly: one batch served per step, the same tasks and the same data settings."""
    if saved.get("data_step") != step:
        raise ConfigError(
            f"checkpoint {step} in {directory} records data position "
            f"{saved.get('data_step')} after {step} steps; cannot resume exactly"
        )
    task_names = list(experiment.task_names)
    if list(saved.get("task_names", [])) != task_names:
        raise ConfigError(
            f"checkpoint {step} in {directory} was trained on tasks {saved.get('task_names')}, "
            f"but the config has {task_names}; use a new --workdir"
        )
    now = _data_settings(experiment.config)
    before = saved.get("data", now)  # checkpoints older than this record have none
    # A setting a checkpoint does not record is one it predates: the default then held.
    changed = {k: (before[k], now[k]) for k in now if k in before and before[k] != now[k]}
    if changed:
        described = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(
            f"checkpoint {step} in {directory} was trained with other data settings "
            f"({described}); resuming would not continue its batches; use a new --workdir"
        )


def usage_tables(spec, state: dict) -> dict[str, np.ndarray]:
    """{layer: usage EMA [T, E]} of a train state, on the host (the tables are replicated,
    so this process's copy is the whole table on any number of processes)."""
    model = nnx.merge(spec.graphdef, state["params"], state["model_state"])
    return {
        name: np.asarray(table.addressable_data(0)) for name, table in model.usage_tables().items()
    }


def _report(experiment: Prepared, workdir: str, splits, routing, usage) -> None:
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
        for layer, table in usage.items():
            name = layer.replace("/", "_")
            written.append(
                plots.routing_heatmap(
                    table,
                    task_names,
                    layer,
                    os.path.join(plot_dir, f"usage_{name}.png"),
                    what="training usage EMA per task",
                )
            )
    table = evaluate_lib.results_table(
        task_names,
        experiment.task_num_classes,
        experiment.task_modalities,
        splits,
        warm_start.task_groups(experiment),
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
