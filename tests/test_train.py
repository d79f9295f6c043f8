"""Training end to end on the simulated 8-device CPU mesh, with a tiny model and 3 tasks.

One uninterrupted run (module fixture) is the reference for the rest: the loss goes down
on every task; resuming from its midway checkpoint reproduces it bitwise; its final
checkpoint restored onto another mesh gives the same eval numbers; and the command line
handles SIGTERM and bad configs as documented.
"""

import asyncio
import errno
import gc
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multihost import run_processes  # noqa: I001 (tests/ is on the path)

from multitask_moe.core import checkpoint as checkpoint_lib
from multitask_moe.core import config_lib, failed_reads
from multitask_moe.core.checkpoint import Checkpoints, CheckpointWriteError
from multitask_moe.core.config_lib import parse_weights
from multitask_moe.train import ConfigError, NonFiniteLossError, run, train_and_evaluate
from multitask_moe.train.metrics import read_history
from multitask_moe.train.setup import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF = 32  # the resume point; the reference run trains 2 * HALF steps

# Overrides of configs/default.py: the same structure (image + tabular tasks, MoE in odd
# blocks, task-aware routing, (2, 4) mesh), small enough to compile and run in seconds.
TINY = {
    "data.tasks": "digits/class=1, iris=1, synthetic/a0=1",
    "data.test_split": "",
    "batch_size": 32,
    "eval_batch_size": 64,
    "num_train_steps": 2 * HALF,
    "log_every_steps": 8,
    "eval_every_steps": HALF,
    "checkpoint_every_steps": HALF,
    "optimizer.learning_rate": 1e-2,
    "optimizer.warmup_steps": 2,
    "model.d_model": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.mlp_dim": 32,
    "model.moe.num_experts": 8,
    "progress_bar": False,
}


def default_config():
    from ml_collections import config_flags

    return config_flags.config_flags.ConfigFileFlagParser(name="config").parse(
        os.path.join(REPO, "configs", "default.py")
    )


def tiny_config(**changes):
    return config_lib.set_fields(default_config(), {**TINY, **changes})


def cli(workdir, *extra, overrides=None):
    args = [
        sys.executable,
        "-m",
        "multitask_moe.train",
        "--config=configs/default.py",
        f"--workdir={workdir}",
    ]
    args += [f"--config.{key}={value}" for key, value in (overrides or TINY).items()]
    return args + list(extra)


@pytest.fixture(scope="module")
def experiment():
    """The tiny config prepared (and its steps compiled) once for the module."""
    return prepare(tiny_config())


@pytest.fixture(scope="module")
def reference(experiment, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, run(experiment, str(workdir))


def train_records(workdir):
    return [r for r in read_history(str(workdir)) if "train/loss" in r]


def restore_latest(workdir, experiment):
    with jax.set_mesh(experiment.mesh):
        checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=2)
        step = checkpoints.latest_step()
        state, progress = checkpoints.restore(step, experiment.model.spec.abstract)
        checkpoints.close()
    # Parameters and model state: the usage statistics must resume exactly too.
    kept = {"params": state["params"], "model_state": state["model_state"]}
    return step, progress, jax.tree.leaves(jax.device_get(kept))


def test_loss_goes_down_on_every_task(reference):
    workdir, results = reference
    records = train_records(workdir)
    assert [r["step"] for r in records] == list(range(8, 2 * HALF + 1, 8))
    for task, classes in zip(parse_weights(TINY["data.tasks"], "tasks"), (10, 3, 4), strict=True):
        # Mean cross-entropy of the first and the last 8 steps (~80 examples each).
        first, last = records[0][f"train/{task}/loss"], records[-1][f"train/{task}/loss"]
        assert last < 0.92 * first, (task, first, last)
        assert results[f"eval/{task}/accuracy"] > 1.2 / classes, task


def test_run_writes_metrics_tensorboard_plots_table_and_checkpoints(reference):
    workdir, results = reference
    files = set(os.listdir(workdir))
    assert {
        "metrics.jsonl",
        "tensorboard",
        "plots",
        "checkpoints",
        "results.txt",
        "config.json",
    } <= files
    assert sorted(os.listdir(workdir / "plots")) == [
        "learning_curves.png",
        "routing_block1_moe.png",
        "usage_block1_moe.png",
    ]
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(HALF), str(2 * HALF)]
    record = train_records(workdir)[-1]
    for key in (
        "train/task_loss",
        "train/aux/load_balance_loss",
        "train/dropped_fraction",
        "train/block1/moe/expert_load_max",
        "train/block1/moe/iris/effective_experts",
        "steps_per_sec",
        "examples_per_sec",
    ):
        assert np.isfinite(record[key]), key
    shares = [
        record[f"time/{kind}_share"] for kind in ("step", "input", "evaluation", "checkpoint")
    ]
    assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    assert record["time/evaluation_share"] > 0 and record["time/checkpoint_share"] > 0

    # exp(entropy) of a top-2 routing over 8 experts lies in [2, 8].
    assert 2 - 1e-4 <= record["train/block1/moe/iris/effective_experts"] <= 8 + 1e-4
    evals = [r for r in read_history(str(workdir)) if "eval/iris/accuracy" in r]
    assert [r["step"] for r in evals] == [HALF, 2 * HALF]
    assert evals[-1]["eval/iris/accuracy"] == results["eval/iris/accuracy"]
    table = (workdir / "results.txt").read_text()
    assert all(task in table for task in ("digits/class", "iris", "synthetic/a0"))


def test_resume_from_the_midway_checkpoint_equals_the_uninterrupted_run(
    experiment, reference, tmp_path
):
    workdir, results = reference
    # A run that stopped at HALF (its checkpoint, written asynchronously mid-run) resumes.
    shutil.copytree(workdir / "checkpoints" / str(HALF), tmp_path / "checkpoints" / str(HALF))
    resumed = run(experiment, str(tmp_path))
    # Same batches and same compiled step: bitwise equal on CPU.
    assert resumed == results
    expected = {r["step"]: r for r in train_records(workdir)}
    got = train_records(tmp_path)
    assert [r["step"] for r in got] == [s for s in expected if s > HALF]
    for record in got:
        for key, value in record.items():
            if key.startswith("train/"):
                assert value == expected[record["step"]][key], (record["step"], key)
    step_a, _, params_a = restore_latest(workdir, experiment)
    step_b, progress, params_b = restore_latest(tmp_path, experiment)
    assert step_a == step_b == progress["data_step"] == 2 * HALF
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)


def rewrite_progress(checkpoint_dir, **changes):
    """Edits the progress JSON of a copied checkpoint (what another run would have saved)."""
    path = checkpoint_dir / "progress" / "metadata"
    progress = json.loads(path.read_text())
    progress.update(changes)
    path.write_text(json.dumps(progress))


def test_resume_refuses_a_data_position_that_is_not_the_step(experiment, reference, tmp_path):
    # A loop that drew one batch outside a step would have saved position HALF + 1.
    workdir, _ = reference
    copy = tmp_path / "checkpoints" / str(HALF)
    shutil.copytree(workdir / "checkpoints" / str(HALF), copy)
    rewrite_progress(copy, data_step=HALF + 1)
    with pytest.raises(ConfigError, match=rf"records data position {HALF + 1} after {HALF} steps"):
        run(experiment, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == [str(HALF)]


def test_resume_refuses_other_data_settings(reference, tmp_path):
    workdir, _ = reference
    shutil.copytree(workdir / "checkpoints" / str(HALF), tmp_path / "checkpoints" / str(HALF))
    with pytest.raises(ConfigError, match=r"other data settings \(seed: 0 -> 1\)"):
        train_and_evaluate(tiny_config(seed=1), str(tmp_path))
    order = r"\(order: 'process' -> 'global', process_count: 1 -> 'any'\)"
    with pytest.raises(ConfigError, match=order):
        train_and_evaluate(tiny_config(**{"data.order": "global"}), str(tmp_path))


@pytest.mark.slow  # restores onto two meshes (the suite's time budget)
def test_checkpoint_restores_onto_another_mesh_with_the_same_eval(reference, tmp_path):
    workdir, results = reference
    final = str(2 * HALF)
    shutil.copytree(workdir / "checkpoints" / final, tmp_path / "checkpoints" / final)
    # (2, 4) -> (1, 8): 8 experts go from 2 to 1 per device; nothing left to train.
    restored = train_and_evaluate(tiny_config(**{"mesh.data": 1, "mesh.expert": 8}), str(tmp_path))
    for key, value in results.items():
        if key.endswith("/accuracy") or key.endswith("num_examples"):
            assert restored[key] == value, key
        else:
            np.testing.assert_allclose(restored[key], value, rtol=1e-5, err_msg=key)


def copy_checkpoints(source, target, *steps):
    for step in steps:
        shutil.copytree(source / "checkpoints" / str(step), target / "checkpoints" / str(step))


def largest_array_file(step_dir):
    return max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def test_a_failed_reads_unretrieved_orbax_tasks_are_silenced_and_nothing_else(caplog):
    """asyncio reports a task whose error nobody retrieved, with a traceback; after a failed
    restore, Orbax's read tasks are such tasks (seen in a 2-process run's log). Inside the
    quiet block and after a failed read they are dropped; other tasks' errors are not."""
    namespace = {}
    source = "async def read():\n    raise ValueError('OUT_OF_RANGE: truncated')\n"
    exec(compile(source, os.path.join(os.sep, "site", "orbax", "read.py"), "exec"), namespace)

    async def other():
        raise ValueError("not a read")

    def leave_unretrieved(coroutine_function):
        loop = asyncio.new_event_loop()
        task = loop.create_task(coroutine_function())
        loop.run_until_complete(asyncio.sleep(0.01))  # the task runs and fails
        loop.close()
        del task
        gc.collect()  # asyncio reports it when the task is collected

    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            with failed_reads.QuietFailedReads() as quiet:
                quiet.failed = True
                leave_unretrieved(namespace["read"])
            leave_unretrieved(namespace["read"])  # a late one, after the failed read
            leave_unretrieved(other)
    finally:
        logging.getLogger("asyncio").removeFilter(failed_reads.drop_orbax_task_errors)
    reports = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(reports) == 1 and str(reports[0].exc_info[1]) == "not a read"


# A failed read's leftovers (late tensorstore callbacks, dead read coroutines) would print
# as unraisable tracebacks after the one-line warning: none may reach the user.
QUIET = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@QUIET
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_resumes(
    experiment, reference, tmp_path, capsys
):
    workdir, results = reference
    copy_checkpoints(workdir, tmp_path, HALF, 2 * HALF)
    latest = tmp_path / "checkpoints" / str(2 * HALF)
    with open(largest_array_file(latest), "r+b") as f:  # a write cut short
        f.truncate(64)
    resumed = run(experiment, str(tmp_path))
    assert resumed == results  # from step HALF, bit-identical to the uninterrupted run
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and f"checkpoint step {2 * HALF} in " in warnings[0]
    aside = tmp_path / "checkpoints.unreadable" / str(2 * HALF)
    assert f"moved it to {aside}" in warnings[0]
    assert aside.is_dir()  # kept for a person to inspect, never deleted
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(HALF), str(2 * HALF)]


@QUIET
@pytest.mark.parametrize(
    "damage", ["array files gone", pytest.param("progress missing", marks=pytest.mark.slow)]
)
def test_a_damaged_step_falls_back_to_the_previous_one(experiment, reference, tmp_path, damage):
    workdir, _ = reference
    copy_checkpoints(workdir, tmp_path, HALF, 2 * HALF)
    latest = tmp_path / "checkpoints" / str(2 * HALF)
    if damage == "array files gone":  # a step directory copied or written only in part
        for data in glob.glob(f"{latest}/state/**/d", recursive=True):
            shutil.rmtree(data)
    else:
        os.remove(latest / "progress" / "metadata")
    warnings = []
    with jax.set_mesh(experiment.mesh):
        checkpoints = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
        step, _, progress = checkpoints.restore_latest_readable(
            experiment.model.spec.abstract, warnings.append
        )
        checkpoints.close()
    assert step == progress["data_step"] == HALF
    assert len(warnings) == 1 and f"step {2 * HALF}" in warnings[0]
    assert os.listdir(tmp_path / "checkpoints.unreadable") == [str(2 * HALF)]


def test_killed_writes_partial_steps_are_cleared_by_the_next_writer_only(tmp_path):
    """Kills during the writes of steps 8 and 12 leave their temporary directories; the
    resumed run clears both before it writes (it rewrites step 8 and may never reach 12).
    Readers (evaluation, extraction) leave them: they may be a live run's writes."""
    directory = tmp_path / "checkpoints"
    first = Checkpoints(str(directory), keep=3, enable_async=False)
    first.save(4, {"w": np.arange(6.0)}, {"data_step": 4})
    first.close()
    partial = [directory / f"{step}.orbax-checkpoint-tmp" for step in (8, 12)]
    for path in partial:
        shutil.copytree(directory / "4", path)
        for data in glob.glob(f"{path}/**/d/*", recursive=True):
            os.truncate(data, 3)  # cut off mid-write
    reader = Checkpoints(str(directory), keep=3)
    reader.close()
    assert all(path.exists() for path in partial)
    writer = Checkpoints(str(directory), keep=3, writer=True)
    assert writer.latest_step() == 4
    writer.save(8, {"w": np.arange(6.0) + 1}, {"data_step": 8})
    writer.close()
    assert sorted(os.listdir(directory)) == ["4", "8"]
    reader = Checkpoints(str(directory), keep=3)
    state, progress = reader.restore(8, {"w": jax.ShapeDtypeStruct((6,), np.float64)})
    reader.close()
    assert progress["data_step"] == 8
    np.testing.assert_array_equal(state["w"], np.arange(6.0) + 1)


@pytest.mark.slow  # compiles a second model
def test_resume_with_other_parameter_shapes_names_the_changed_fields(reference, tmp_path):
    workdir, _ = reference
    copy_checkpoints(workdir, tmp_path, 2 * HALF)
    shutil.copy(workdir / "config.json", tmp_path / "config.json")
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError) as caught:
        train_and_evaluate(tiny_config(**{"model.mlp_dim": 48}), str(tmp_path))
    message = str(caught.value)
    assert "holds arrays of other shapes than this model" in message
    assert "model.mlp_dim: 32 -> 48" in message and "\n" not in message
    # Nothing written: the old config and the checkpoint stay, nothing moved aside.
    assert (tmp_path / "config.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]


@pytest.mark.slow  # a whole run
def test_a_failing_checkpoint_write_names_the_step_and_keeps_the_previous(
    experiment, tmp_path, monkeypatch
):
    save = checkpoint_lib.ocp.CheckpointManager.save

    def disk_full_at_the_second_save(self, step, *args, **kwargs):
        if step > HALF:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", disk_full_at_the_second_save)
    with pytest.raises(CheckpointWriteError) as caught:
        run(experiment, str(tmp_path))
    assert str(caught.value) == (
        f"could not write checkpoint step {2 * HALF} to {tmp_path / 'checkpoints'}: "
        f"[Errno 28] No space left on device; step {HALF} is intact"
    )
    monkeypatch.undo()
    step, progress, params = restore_latest(tmp_path, experiment)
    assert step == progress["data_step"] == HALF and os.listdir(tmp_path / "checkpoints") == [
        str(HALF)
    ]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    # A huge learning rate: step 1 is finite, its update overflows the parameters, and
    # step 2's loss is not.
    config = tiny_config(
        **{
            "optimizer.learning_rate": 1e30,
            "optimizer.warmup_steps": 0,
            "checkpoint_every_steps": 1,
            "num_train_steps": 6,
            "eval_every_steps": 0,
        }
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"at step 2; the last good checkpoint is "
        r"step 1",
    ):
        train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


@pytest.mark.slow  # a CLI process start and compile (the suite's time budget)
def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(experiment, tmp_path):
    workdir = tmp_path / "run"
    overrides = {
        **TINY,
        "num_train_steps": 100_000,
        "log_every_steps": 2,
        "checkpoint_every_steps": 50_000,
        "eval_every_steps": 0,
    }
    process = subprocess.Popen(
        cli(workdir, overrides=overrides),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "metrics.jsonl").exists() or not train_records(workdir):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    steps = os.listdir(workdir / "checkpoints")
    assert len(steps) == 1 and f"saved a checkpoint at step {steps[0]}" in stdout
    # Restorable (same shapes as the module's experiment), with the data position saved.
    step, progress, params = restore_latest(workdir, experiment)
    assert step == int(steps[0]) == progress["data_step"] > 0
    assert all(np.all(np.isfinite(p)) for p in params)


def _kill_when(process, ready, deadline_s: float = 240) -> bool:
    """SIGKILLs `process` as soon as ready() holds; False if it ended first."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run did not reach the kill moment"
        time.sleep(0.002)
    process.kill()
    process.wait()
    return True


def _temporary_steps(workdir) -> set[str]:
    """Orbax's in-progress step directories (renamed to the step once complete)."""
    directory = workdir / "checkpoints"
    return (
        {name for name in os.listdir(directory) if "tmp" in name} if directory.is_dir() else set()
    )


def _reached_step(workdir, step: int) -> bool:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return False
    lines = [line for line in path.read_text().splitlines() if '"train/loss"' in line]
    return bool(lines) and json.loads(lines[-1])["step"] >= step


@pytest.mark.slow  # six process starts
def test_sigkill_at_five_moments_then_resume_ends_bit_identical(experiment, reference, tmp_path):
    """kill -9 at five moments drawn from a seed, one of them while Orbax writes a
    checkpoint asynchronously; rerunning the same command each time ends with the
    parameters of the uninterrupted run, bit for bit."""
    reference_dir, _ = reference
    workdir = tmp_path / "run"
    overrides = {**TINY, "log_every_steps": 1, "checkpoint_every_steps": 4}
    rng = np.random.default_rng(20261202)
    targets = sorted(rng.choice(np.arange(5, 2 * HALF - 4), size=4, replace=False).tolist())
    moments = [("during a checkpoint write", lambda left: _temporary_steps(workdir) - left)]
    moments += [(f"after step {t}", lambda _, t=t: _reached_step(workdir, t)) for t in targets]
    killed = []
    for name, ready in [moments[i] for i in rng.permutation(len(moments))]:
        left_over = _temporary_steps(workdir)  # from an earlier kill: not a write under way
        process = subprocess.Popen(
            cli(workdir, overrides=overrides),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if _kill_when(process, lambda ready=ready, left=left_over: ready(left)):
            killed.append(name)
        else:
            assert process.returncode == 0, process.stderr.read()
    assert len(killed) >= 4, killed  # a later target may fall before a resume point
    assert "during a checkpoint write" in killed
    final = subprocess.run(
        cli(workdir, overrides=overrides), cwd=REPO, capture_output=True, text=True
    )
    assert final.returncode == 0 and "Traceback" not in final.stderr, final.stderr
    step_a, _, params_a = restore_latest(reference_dir, experiment)
    step_b, progress, params_b = restore_latest(workdir, experiment)
    assert step_a == step_b == progress["data_step"] == 2 * HALF
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)


MULTIPROCESS = {**TINY, "num_cpu_devices": 4, "log_every_steps": 1, "data.order": "global"}


def multiprocess_args(workdir, **changes):
    overrides = {**MULTIPROCESS, **changes}
    flags = [f"--workdir={workdir}", "--config=configs/default.py"]
    return flags + [f"--config.{key}={value}" for key, value in overrides.items()]


TRAIN_SCRIPT = REPO + "/multitask_moe/train/__main__.py"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted run of 2 processes x 4 CPU devices (gloo): its workdir."""
    straight = tmp_path_factory.mktemp("two_processes")
    run_processes(TRAIN_SCRIPT, multiprocess_args(straight), log_dir=straight / "logs")
    return straight


@pytest.mark.slow  # three multi-process runs
@pytest.mark.multiprocess
def test_two_processes_train_preempt_and_resume_exactly(
    experiment, reference, two_processes, tmp_path
):
    """2 processes x 4 CPU devices (gloo) run the whole loop: each feeds its own rows of
    the batch, evaluates, checkpoints; SIGTERM to process 1 alone stops both after the same
    step with a checkpoint (JAX's preemption sync point); the rerun resumes and ends with
    the parameters of an uninterrupted 2-process run, bit for bit, and of 1 process x 8
    devices: with data.order="global" the global batches do not depend on the process
    count (the default "process" order shards and shuffles per process).
    """
    _, results = reference
    workdir, sent = tmp_path / "run", []

    def preempt_process_1(procs):
        if not sent and _reached_step(workdir, 8):
            procs[1].send_signal(signal.SIGTERM)
            sent.append(True)

    args = multiprocess_args(workdir)
    run_processes(TRAIN_SCRIPT, args, log_dir=tmp_path / "logs_a", on_poll=preempt_process_1)
    assert sent
    logs = [(tmp_path / "logs_a" / f"process_{i}.log").read_text() for i in (0, 1)]
    stopped = [line for line in logs[0].splitlines() if line.startswith("SIGTERM: saved")]
    assert len(stopped) == 1, logs[0][-3000:]
    assert all("Traceback" not in log for log in logs)
    step = int(os.listdir(workdir / "checkpoints")[-1])
    assert 8 <= step < 2 * HALF and f"at step {step} in" in stopped[0]

    run_processes(TRAIN_SCRIPT, args, log_dir=tmp_path / "logs_b")
    assert f"Resuming from step {step}" in (tmp_path / "logs_b" / "process_0.log").read_text()
    step_a, _, params_a = restore_latest(two_processes, experiment)
    step_b, progress, params_b = restore_latest(workdir, experiment)
    assert step_a == step_b == progress["data_step"] == 2 * HALF
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)
    one = tmp_path / "one_process"
    run_processes(
        TRAIN_SCRIPT,
        multiprocess_args(one, num_cpu_devices=8),
        log_dir=tmp_path / "logs_one",
        num_processes=1,
        devices_per_process=8,
    )
    _, _, params_one = restore_latest(one, experiment)
    for a, b in zip(params_a, params_one, strict=True):
        np.testing.assert_array_equal(a, b)
    final = [r for r in read_history(str(workdir)) if "eval/iris/accuracy" in r][-1]
    straight_final = [r for r in read_history(str(two_processes)) if "eval/iris/accuracy" in r]
    assert final == straight_final[-1]
    assert abs(final["eval/mean_accuracy"] - results["eval/mean_accuracy"]) < 0.15


@pytest.mark.slow  # two multi-process runs
@pytest.mark.multiprocess
def test_two_processes_resume_exactly_in_the_process_order(experiment, tmp_path):
    """The default order (each process streams and shuffles its own shard) over 2 x 4
    devices: a run resumed from its step-HALF checkpoint ends with the parameters of the
    uninterrupted run, bit for bit."""
    straight = tmp_path / "straight"
    order = {"data.order": "process"}
    run_processes(TRAIN_SCRIPT, multiprocess_args(straight, **order), log_dir=tmp_path / "a")
    resumed = tmp_path / "resumed"
    copy_checkpoints(straight, resumed, HALF)
    run_processes(TRAIN_SCRIPT, multiprocess_args(resumed, **order), log_dir=tmp_path / "b")
    assert f"Resuming from step {HALF}" in (tmp_path / "b" / "process_0.log").read_text()
    _, _, expected = restore_latest(straight, experiment)
    step, progress, params = restore_latest(resumed, experiment)
    assert step == progress["data_step"] == 2 * HALF
    for a, b in zip(expected, params, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a multi-process run
@pytest.mark.multiprocess
def test_two_processes_move_a_damaged_step_aside_together(experiment, two_processes, tmp_path):
    """The latest step of a 2-process run damaged where both processes read it: both give
    it up, with one warning and no traceback, resume from the step before and end with the
    uninterrupted run's parameters."""
    copy_checkpoints(two_processes, tmp_path, HALF, 2 * HALF)
    with open(largest_array_file(tmp_path / "checkpoints" / str(2 * HALF)), "r+b") as f:
        f.truncate(64)
    run_processes(TRAIN_SCRIPT, multiprocess_args(tmp_path), log_dir=tmp_path / "logs")
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in (0, 1)]
    assert all(f"checkpoint step {2 * HALF} in" in log for log in logs), logs[0][-3000:]
    assert f"Resuming from step {HALF}" in logs[0] and "Traceback" not in logs[0] + logs[1]
    assert os.listdir(tmp_path / "checkpoints.unreadable") == [str(2 * HALF)]
    _, _, expected = restore_latest(two_processes, experiment)
    _, _, params = restore_latest(tmp_path, experiment)
    for a, b in zip(expected, params, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two multi-process runs
@pytest.mark.multiprocess
def test_two_processes_give_up_a_step_that_only_one_of_them_cannot_read(experiment, tmp_path):
    """Experts sharded across the processes (mesh 1 x 8 over 2 x 4 devices): process 1
    alone reads its experts' file. Truncated, its read fails while process 0's succeeds;
    both must give the step up together (before, process 0 waited for ever in Orbax's
    restore barrier), resume from the step before and end with the uninterrupted run's
    parameters."""
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    args = {"mesh.data": 1, "mesh.expert": 8}
    run_processes(TRAIN_SCRIPT, multiprocess_args(straight, **args), log_dir=tmp_path / "a")
    copy_checkpoints(straight, damaged, HALF, 2 * HALF)
    files = glob.glob(f"{damaged}/checkpoints/{2 * HALF}/state/ocdbt.process_1/d/*")
    with open(max(files, key=os.path.getsize), "r+b") as f:  # process 1's experts
        f.truncate(64)
    run_processes(TRAIN_SCRIPT, multiprocess_args(damaged, **args), log_dir=tmp_path / "b")
    logs = [(tmp_path / "b" / f"process_{i}.log").read_text() for i in (0, 1)]
    assert f"checkpoint step {2 * HALF} in" in logs[1], logs[1][-3000:]
    assert "process 1 could not read it" in logs[0], logs[0][-3000:]
    assert f"Resuming from step {HALF}" in logs[0] and "Traceback" not in logs[0] + logs[1]
    assert os.listdir(damaged / "checkpoints.unreadable") == [str(2 * HALF)]
    _, _, expected = restore_latest(straight, experiment)  # onto the (2, 4) mesh
    _, _, params = restore_latest(damaged, experiment)
    for a, b in zip(expected, params, strict=True):
        np.testing.assert_array_equal(a, b)


def _train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "multitask_moe.train", *args]


# name -> (command for a workdir, a fragment of its one error line). Config values are
# swept through the library in test_bad_inputs.py; these are the command line's own.
BAD_COMMANDS = {
    "task weight not a number": (
        lambda w: cli(w, "--config.data.tasks=wine=abc"),
        "data.tasks: weight 'abc' of 'wine' is not a number",
    ),
    "unknown key": (
        lambda w: cli(w, "--config.model.no_such_key=1"),
        "unknown config key 'model.no_such_key'",
    ),
    "missing config file": (
        lambda w: _train_command("--config=configs/nope.py", f"--workdir={w}"),
        "could not load --config=configs/nope.py: no such file",
    ),
    "bad config argument": (
        lambda w: _train_command("--config=configs/default.py:bogus", f"--workdir={w}"),
        "unknown config arg 'bogus'",
    ),
    "no workdir": (
        lambda w: _train_command("--config=configs/default.py"),
        "--workdir is required",
    ),
    "positional argument": (
        lambda w: _train_command("--config=configs/default.py", f"--workdir={w}", "extra"),
        "unexpected arguments ['extra']",
    ),
    "workdir under a file": (
        lambda w: cli(w.parent / "a_file" / "run", "--config.num_train_steps=1"),
        "cannot be created",
    ),
}


# In `make test`; the rest of the table runs with the slow tests (a process start each).
QUICK_COMMANDS = ("task weight not a number", "missing config file")


@pytest.mark.parametrize(
    "names",
    [
        QUICK_COMMANDS,
        pytest.param(
            tuple(n for n in BAD_COMMANDS if n not in QUICK_COMMANDS), marks=pytest.mark.slow
        ),
    ],
    ids=["quick", "rest"],
)
def test_bad_commands_fail_with_one_line_and_write_nothing(names, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    processes = {}
    for name in names:
        command = BAD_COMMANDS[name][0]
        workdir = tmp_path / name.replace(" ", "_")
        processes[name] = (
            workdir,
            subprocess.Popen(
                command(workdir),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (workdir, process) in processes.items():
        _, stderr = process.communicate(timeout=300)
        expected = BAD_COMMANDS[name][1]
        assert process.returncode == 2, (name, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        assert not workdir.exists(), name
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_second_run_in_a_busy_workdir_stops_before_writing(experiment, tmp_path):
    """A live run owns the workdir (its lock names a live process): the second run stops
    with one line naming it, and writes nothing (no config.json over the first run's)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": sleeper.pid, "started": 0.0}
        (tmp_path / "run.lock").write_text(json.dumps(lock))
        with pytest.raises(ConfigError, match=f"another run \\(pid {sleeper.pid} on this host"):
            run(experiment, str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_prepare_raises_config_error_for_a_bad_routing():
    with pytest.raises(ConfigError, match="routing='sideways'"):
        prepare(tiny_config(**{"model.moe.routing": "sideways"}))


def test_prepare_refuses_the_ragged_exchange_on_cpu():
    dropless = {"model.moe.capacity_factor": None, "model.moe.eval_capacity_factor": None}
    with pytest.raises(ConfigError, match="exchange='ragged' needs a GPU or TPU backend"):
        prepare(tiny_config(**dropless, **{"model.moe.exchange": "ragged"}))


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        {"model.moe.routing": "tokens", "profile_steps": 2},
        {"model.moe.routing": "experts"},
        {"model.moe.routing": "task"},
        {"model.moe.routing": "per_task"},
        {"model.moe.capacity_factor": None, "model.moe.eval_capacity_factor": None},
        {"model.moa_every": 2, "model.moa.routing": "task_tokens"},
        {"model.dtype": "bfloat16"},
    ],
    ids=["tokens", "experts", "task", "per_task", "dropless", "moa", "bfloat16"],
)
def test_every_model_variant_trains_on_the_mesh(variant, tmp_path):
    """Each variant's mean train loss over steps 5-8 is below that over steps 1-4; the
    bfloat16 model's losses are the float32 model's within 5%."""
    short = {"num_train_steps": 8, "log_every_steps": 4, "eval_every_steps": 0}
    config = tiny_config(**{**short, "checkpoint_every_steps": 0, **variant})
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert all(np.isfinite(value) for value in results.values())
    losses = [r["train/loss"] for r in train_records(tmp_path / "run")]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    if variant.get("model.dtype") == "bfloat16":
        float32 = tiny_config(**{**short, "checkpoint_every_steps": 0})
        train_and_evaluate(float32, str(tmp_path / "float32"))
        want = [r["train/loss"] for r in train_records(tmp_path / "float32")]
        np.testing.assert_allclose(losses, want, rtol=0.05)
    if variant.get("profile_steps"):  # a trace of steps 4-5 for TensorBoard's profile plugin
        assert list((tmp_path / "run" / "tensorboard").glob("plugins/profile/*/*.xplane.pb"))
