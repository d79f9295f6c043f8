"""Adding tasks to a trained model: warm start by task name, new-task initialization,
freezing, and example limits.

One tiny source model per routing mode (capacity, dropless) is trained once on the (2, 4)
mesh. References: the source checkpoint's own values (rows matched by name), the fresh
initialization of a run without init_from (rows of scratch tasks), and the source's
evaluation logits (bit-identical under freeze=shared).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from test_train import tiny_config

from multitask_moe import data, lifecycle, models
from multitask_moe.errors import ConfigError
from multitask_moe.lifecycle import evaluation
from multitask_moe.train import nearest, train_and_evaluate
from multitask_moe.train.setup import prepare

SEEN = "digits/class=1, iris=1, synthetic/a0=1"
# Seen tasks in another order, a new task of a seen modality (limited to 50 examples) and
# a new tabular task.
GROWN = "synthetic/a0=1, wine=1, digits/class=1, synthetic/a1=1@50, iris=1"
COMMON = {
    "eval_every_steps": 0,
    "checkpoint_every_steps": 0,
    "write_plots": False,
}
DROPLESS = {"model.moe.capacity_factor": None, "model.moe.eval_capacity_factor": None}


def _source(tmp_path_factory, name, **changes):
    workdir = str(tmp_path_factory.mktemp(name))
    config = tiny_config(**{"data.tasks": SEEN, "num_train_steps": 24, **COMMON, **changes})
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _source(tmp_path_factory, "source")


@pytest.fixture(scope="module")
def source_dropless(tmp_path_factory):
    return _source(tmp_path_factory, "source_dropless", **DROPLESS)


def grown_config(source, **changes):
    return tiny_config(
        **{
            "data.tasks": GROWN,
            "init_from": source,
            "num_train_steps": 8,
            **COMMON,
            **changes,
        }
    )


def values(workdir):
    """(task names, {path: (host value, is a parameter)}, axis tags) of a checkpoint."""
    restored = lifecycle.restore(workdir)
    model = evaluation.evaluation_model(restored)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    out = {}
    for part, is_param in ((params, True), (rest, False)):
        for path, value in traverse_util.flatten_dict(nnx.to_pure_dict(part)).items():
            if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                out[path] = (np.asarray(value), is_param)
    return restored.experiment, out, models.axis_tags(model)


def test_warm_start_keeps_seen_rows_by_name_and_starts_new_tasks_as_asked(source, tmp_path):
    """Zero steps: the checkpoint is the warm-started state itself. Reference: the source
    checkpoint by task name, and the fresh initialization of the grown task list."""
    workdir = str(tmp_path / "grown")
    config = grown_config(
        source, num_train_steps=0, new_task_init="synthetic/a1=synthetic/a0, wine=scratch"
    )
    train_and_evaluate(config, workdir)
    fresh_dir = str(tmp_path / "fresh")
    fresh_config = tiny_config(**{**COMMON, "data.tasks": GROWN, "num_train_steps": 0})
    train_and_evaluate(fresh_config, fresh_dir)
    old_experiment, old, _ = values(source)
    experiment, new, tags = values(workdir)
    _, fresh, _ = values(fresh_dir)
    old_names, names = old_experiment.task_names, experiment.task_names
    starts = {"synthetic/a1": "synthetic/a0"}
    task_indexed = 0
    for path, (value, is_param) in new.items():
        axis = tags.get(path, {}).get("task_axis")
        if axis is None:  # shared by all tasks: the source's value
            np.testing.assert_array_equal(value, old[path][0], err_msg=str(path))
            continue
        task_indexed += 1
        heads = "class_axis" in tags[path]
        for t, name in enumerate(names):
            got = np.take(value, t, axis)
            if name in old_names:  # a seen task: its own source row, wherever it now is
                want = np.take(old[path][0], old_names.index(name), axis)
            elif name in starts and is_param and not heads:  # a seen task's rows
                want = np.take(old[path][0], old_names.index(starts[name]), axis)
            else:  # scratch rows, a new head, fresh statistics: the fresh initialization
                want = np.take(fresh[path][0], t, axis)
            if heads:  # classes past the task's own are padding
                classes = experiment.task_num_classes[t]
                got, want = got[..., :classes], want[..., :classes]
            np.testing.assert_array_equal(got, want, err_msg=f"{path} {name}")
    assert task_indexed >= 5  # embedding, routing rows, two head leaves, usage
    assert os.path.exists(os.path.join(workdir, "warm_start.json"))


@pytest.mark.parametrize(
    "mode",
    ["capacity", pytest.param("dropless", marks=pytest.mark.slow)],  # slow: +50 s
)
def test_shared_freeze_keeps_seen_tasks_bit_identical(mode, request, tmp_path, capsys):
    # Only the source this mode needs is trained (each is a module-wide training).
    base = request.getfixturevalue("source" if mode == "capacity" else "source_dropless")
    workdir = str(tmp_path / "grown")
    changes = DROPLESS if mode == "dropless" else {}
    results = train_and_evaluate(
        grown_config(base, freeze="shared", new_task_init="nearest", **changes), workdir
    )
    out = capsys.readouterr().out
    assert "set" in out and "seen mean" in out and "new mean" in out
    assert "eval/new_mean_accuracy" in results and "eval/seen_mean_accuracy" in results
    before, after = lifecycle.restore(base), lifecycle.restore(workdir)
    for name in ("digits/class", "iris", "synthetic/a0"):
        old_id = before.experiment.task_names.index(name)
        new_id = after.experiment.task_names.index(name)
        classes = before.experiment.task_num_classes[old_id]
        old_logits, old_labels = evaluation.task_logits(before, old_id, "validation")
        new_logits, new_labels = evaluation.task_logits(after, new_id, "validation")
        np.testing.assert_array_equal(old_labels, new_labels)
        np.testing.assert_array_equal(old_logits[:, :classes], new_logits[:, :classes])
    # Every seen row and shared parameter kept its value; the new tasks' rows trained.
    experiment, grown, tags = values(workdir)
    old_experiment, old, _ = values(base)
    names, old_names = experiment.task_names, old_experiment.task_names
    for path, (value, is_param) in grown.items():
        axis = tags.get(path, {}).get("task_axis")
        if not is_param:
            continue
        if axis is None:
            np.testing.assert_array_equal(value, old[path][0], err_msg=str(path))
            continue
        for name in old_names:
            np.testing.assert_array_equal(
                np.take(value, names.index(name), axis),
                np.take(old[path][0], old_names.index(name), axis),
                err_msg=f"{path} {name}",
            )
    # ... and the new tasks trained: against the same warm start after 0 steps, each new
    # task's rows of every task-indexed parameter moved, and its validation loss fell.
    start_dir = str(tmp_path / "start")
    start_results = train_and_evaluate(
        grown_config(base, freeze="shared", new_task_init="nearest", num_train_steps=0, **changes),
        start_dir,
    )
    _, start, _ = values(start_dir)
    new_names = [name for name in names if name not in old_names]
    for path, (value, is_param) in grown.items():
        axis = tags.get(path, {}).get("task_axis")
        if is_param and axis is not None:
            for name in new_names:
                row = names.index(name)
                assert not np.array_equal(
                    np.take(value, row, axis), np.take(start[path][0], row, axis)
                ), f"{path} {name}"
    for name in new_names:
        key = f"eval/{name}/loss"
        assert results[key] < start_results[key], (key, results[key], start_results[key])


@pytest.mark.slow  # a third training of the module (the suite's time budget)
def test_expert_freeze_keeps_expert_weights_and_trains_the_rest(source, tmp_path):
    workdir = str(tmp_path / "grown")
    train_and_evaluate(grown_config(source, freeze="experts"), workdir)
    _, old, _ = values(source)
    _, new, tags = values(workdir)
    experts = [
        p for p, (_, is_param) in new.items() if is_param and "expert_axis" in tags.get(p, {})
    ]
    assert experts
    for path in experts:
        np.testing.assert_array_equal(new[path][0], old[path][0], err_msg=str(path))
    others = [p for p, (v, is_param) in new.items() if is_param and p not in experts]
    trained = [p for p in others if p in old and not np.array_equal(new[p][0], old[p][0])]
    assert any("final_norm" in p for p in trained) and any("router" in p for p in trained)


def test_nearest_score_prefers_the_task_whose_predictions_carry_the_labels():
    """Candidate 0 predicts the new labels through a fixed class permutation, candidate
    1 is noise: 0 scores a far lower held-out loss."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    informative = np.eye(4)[(labels + 1) % 4] * 0.8 + 0.05
    noise = rng.dirichlet(np.ones(4), 60)
    scores = nearest.scores({0: informative, 1: noise}, labels, 4, ["related", "unrelated"])
    assert nearest.nearest(scores) == "related"
    assert scores["related"]["accuracy"] == 1.0
    assert scores["related"]["loss"] < 0.5 < np.log(4) - 0.2 < scores["unrelated"]["loss"]


def test_example_limits_are_a_seeded_subset_of_the_train_split():
    def train_labels(seed, limit=50):
        mixture = data.Mixture(
            {"digits/class": 1.0}, train_examples={"digits/class": limit}, subset_seed=seed
        )
        assert mixture.tasks[0].num_examples("train") == limit
        assert mixture.tasks[0].num_examples("validation") > limit  # only train is cut
        batches = mixture.eval_batches("train", batch_size=64, process_count=1, process_index=0)
        inputs = np.concatenate([b["inputs"][b["valid"]] for _, b in batches])
        assert len(inputs) == limit
        return inputs

    a, again, other = train_labels(0), train_labels(0), train_labels(1)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, other)
    # Two processes read disjoint halves of the same subset.
    mixture = data.Mixture({"digits/class": 1.0}, train_examples={"digits/class": 50})
    parts = [
        np.concatenate(
            [
                b["inputs"][b["valid"]]
                for _, b in mixture.eval_batches(
                    "train", batch_size=64, process_count=2, process_index=i
                )
            ]
        )
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts), 0), np.sort(a, 0))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data.tasks": "digits/class=1@0"}, "example limit must be an int in [1, "),
        ({"data.tasks": "iris=1@100000"}, "iris@100000: the example limit"),
        ({"data.tasks": "iris=1@many"}, "'many' after @ is not an int"),
        ({"freeze": "everything"}, "freeze='everything' is not allowed"),
        ({"freeze": "shared"}, "freeze='shared' needs init_from"),
    ],
)
def test_bad_settings_without_a_source_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError) as error:
        prepare(tiny_config(**changes), compile_train=False, compile_eval=False)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"init_from": "/nonexistent/run"}, "has no config.json"),
        ({"new_task_init": "digits/parity"}, "'digits/parity' (for wine) is not scratch"),
        ({"new_task_init": "iris=nearest"}, "names 'iris', which is not a new task"),
        ({"new_task_init": "sometimes"}, "is not scratch, nearest or a seen task"),
        ({"data.tasks": SEEN, "freeze": "shared"}, "freeze='shared' with no new task"),
        ({"model.d_model": 48}, "model.d_model (32 -> 48)"),
        ({"model.moe.num_experts": 4, "model.depth": 4}, "model.depth (2 -> 4), model.moe"),
    ],
)
def test_bad_warm_starts_are_one_line_errors_that_write_nothing(changes, message, source, tmp_path):
    config = grown_config(source, **changes)
    workdir = tmp_path / "never"
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(config, str(workdir))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not workdir.exists()


def test_empty_checkpoint_directory_is_refused(tmp_path, source):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with open(os.path.join(source, "config.json")) as f:
        (empty / "config.json").write_text(f.read())
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        prepare(grown_config(str(empty)), compile_train=False, compile_eval=False)


@pytest.mark.slow  # ~1.5 min: a source trained long enough to have learned its tasks
def test_nearest_picks_a_related_seen_task(tmp_path):
    """A held-out digits task starts from a digits task, a held-out synthetic/a task from
    a synthetic/a task (never from the unrelated b family)."""
    seen = (
        "digits/class=1, digits/rotated=1, synthetic/a0=1, synthetic/a1=1, "
        "synthetic/b0=1, synthetic/b1=1"
    )
    settings = {**COMMON, "batch_size": 64, "optimizer.learning_rate": 3e-3}
    source = str(tmp_path / "source")
    train_and_evaluate(
        tiny_config(**{**settings, "data.tasks": seen, "num_train_steps": 1000}), source
    )
    grown = str(tmp_path / "grown")
    config = tiny_config(
        **{
            **settings,
            "data.tasks": seen + ", digits/parity=1@50, synthetic/a2=1@50",
            "num_train_steps": 0,
            "init_from": source,
            "new_task_init": "nearest",
        }
    )
    train_and_evaluate(config, grown)
    with open(os.path.join(grown, "warm_start.json")) as f:
        record = json.load(f)["new_tasks"]
    assert record["digits/parity"]["start"] in ("digits/class", "digits/rotated")
    assert record["synthetic/a2"]["start"] in ("synthetic/a0", "synthetic/a1")
    for name in ("digits/parity", "synthetic/a2"):
        assert record[name]["rule"] == "nearest" and len(record[name]["scores"]) == 6
