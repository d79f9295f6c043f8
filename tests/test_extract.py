"""Extraction of a per-task model, evaluation of any trained directory, and export.

One tiny source model is trained once on the (2, 4) mesh: an MoA block with per-task
routers (Mod-Squad) and a dropless MoE block routed by task (Task-MoE), three tasks plus
one of weight 0 (never sampled, so it has no usage statistics). References: the kept
experts are recomputed here from the rules (top-k of the routing row; usage shares over
threshold / K), and the extracted model is compared with the full one on the same
examples.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_train import tiny_config

from multitask_moe import lifecycle
from multitask_moe.lifecycle import evaluation
from multitask_moe.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "digits/class"
# A sliced-router extraction against its source on the task's validation examples: the
# least share of equal predictions (measured 1.0: this tiny source predicts one class for
# most examples, so the logits carry the check) and the largest logit change as a share
# of the source's largest logit deviation from its mean (measured 0.10).
SLICED_AGREEMENT = 0.9
SLICED_LOGIT_SHIFT = 0.25


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    config = tiny_config(
        **{
            "data.tasks": "digits/class=1, iris=1, synthetic/a0=1, synthetic/a1=0",
            "num_train_steps": 24,
            "eval_every_steps": 0,
            "checkpoint_every_steps": 0,
            "write_plots": False,
            "model.moa_every": 2,
            "model.moa.routing": "per_task",
            "model.moe.routing": "task",
            "model.moe.capacity_factor": None,
            "model.moe.eval_capacity_factor": None,
        }
    )
    train_and_evaluate(config, str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def exact(source, tmp_path_factory):
    """Full routers and usage counted on data, a tiny threshold: MoA keeps every expert
    the task's training tokens chose; the task-routed MoE keeps exactly its top-k."""
    out = str(tmp_path_factory.mktemp("exact") / "model")
    summary = lifecycle.extract(source, TASK, out, threshold=1e-6, router="full", usage="data")
    return out, summary


@pytest.fixture(scope="module")
def sliced(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sliced") / "model")
    return out, lifecycle.extract(source, TASK, out, threshold=15.0, export=True)


def test_task_routing_extraction_computes_what_the_full_model_computes(source, exact):
    out, summary = exact
    restored = lifecycle.restore(source)
    layer = evaluation.evaluation_model(restored).sparse_layer("block1/moe")
    row = np.asarray(layer.router.task_logits[...])[0]
    assert summary["kept_experts"]["block1/moe"] == sorted(np.argsort(-row)[:2].tolist())
    for split in ("validation", "test"):
        assert summary["agreement"][split] == 1.0
        assert summary["max_abs_logit_difference"][split] < 1e-5
        assert summary["accuracy_extracted"][split] == summary["accuracy_full"][split]
    assert summary["params_extracted"] < summary["params_full"]
    saved = json.loads(open(os.path.join(out, "extraction.json")).read())
    assert saved["kept_experts"] == summary["kept_experts"]


def test_sliced_extraction_keeps_the_experts_over_the_threshold(source, sliced):
    out, summary = sliced
    restored = lifecycle.restore(source)
    usage = evaluation.evaluation_model(restored).usage_tables()["block0/moa"]
    share = 100 * np.asarray(usage)[0] / np.asarray(usage)[0].sum()
    expected = np.flatnonzero(share > 15.0 / 2)
    if len(expected) < 2:
        expected = np.argsort(-share)[:2]
    assert summary["kept_experts"]["block0/moa"] == sorted(expected.tolist())
    model = evaluation.evaluation_model(lifecycle.restore(out))
    moa = model.sparse_layer("block0/moa")
    assert moa.num_experts == moa.router_width == len(expected)  # sliced router columns
    assert model.task_embedding[...].shape[0] == 1 and set(model.stem.modalities) == {"image"}
    # The sliced router renormalizes over the kept experts, so the extracted model is not
    # exact. Both models' outputs, computed here: predictions agree on SLICED_AGREEMENT of
    # the examples and logits within SLICED_LOGIT_SHIFT of the source's logit spread.
    task_id = restored.experiment.task_names.index(TASK)
    full, labels = evaluation.task_logits(restored, task_id, "validation")
    part, part_labels = evaluation.task_logits(lifecycle.restore(out), 0, "validation")
    classes = restored.experiment.task_num_classes[task_id]
    full, part = full[:, :classes], part[:, :classes]
    spread = np.abs(full - full.mean(-1, keepdims=True)).max()
    assert np.abs(full - part).max() <= SLICED_LOGIT_SHIFT * spread
    agreement = np.mean(np.argmax(full, -1) == np.argmax(part, -1))
    assert np.array_equal(labels, part_labels)
    assert summary["agreement"]["validation"] == agreement >= SLICED_AGREEMENT
    accuracy = np.mean(np.argmax(part, -1) == labels)
    assert summary["accuracy_extracted"]["validation"] == accuracy


@pytest.fixture(scope="module")
def capacity_source(source, tmp_path_factory):
    """The trained source read as a capacity-factor model (1.25 in training, 2.0 in
    evaluation: the default config's, and claims 6 and 8's), its parameters unchanged."""
    copy = tmp_path_factory.mktemp("capacity") / "source"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["moe"].update(capacity_factor=1.25, eval_capacity_factor=2.0)
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def test_extraction_from_a_capacity_factor_source_computes_its_dropless_path(
    source, capacity_source, tmp_path
):
    """All of a task's tokens go to the same two of 8 experts, so the source, at capacity
    2.0 * tokens * 2 / 8 per expert, drops about half of them; the extracted layer's
    capacity comes from its 2 kept experts and one-sequence groups, so it drops none and
    computes what the source computes without a capacity limit."""
    summary = lifecycle.extract(
        capacity_source, TASK, str(tmp_path / "model"), threshold=1e-6, router="full",
        usage="data", splits=("validation",),
    )  # fmt: skip
    capacity = lifecycle.restore(capacity_source)
    task_id = capacity.experiment.task_names.index(TASK)
    limited, labels = evaluation.task_logits(capacity, task_id, "validation")
    dropless, _ = evaluation.task_logits(lifecycle.restore(source), task_id, "validation")
    part, _ = evaluation.task_logits(lifecycle.restore(str(tmp_path / "model")), 0, "validation")
    classes = capacity.experiment.task_num_classes[task_id]
    np.testing.assert_allclose(part[:, :classes], dropless[:, :classes], atol=1e-5)
    assert np.abs(limited - dropless)[:, :classes].max() > 1e-3  # the source does drop
    agreement = np.mean(np.argmax(limited[:, :classes], -1) == np.argmax(part[:, :classes], -1))
    assert summary["agreement"]["validation"] == agreement
    assert summary["accuracy_full"]["validation"] == np.mean(
        np.argmax(limited[:, :classes], -1) == labels
    )


@pytest.mark.slow  # two meshes and a CLI process (the suite's time budget)
def test_extracted_model_gives_the_same_numbers_on_every_mesh(sliced):
    out, _ = sliced
    on_meshes = [
        lifecycle.evaluate_workdir(out, ("validation",), mesh=mesh, write=False)
        for mesh in ({"data": 8, "expert": 1}, {"data": 2, "expert": 4})
    ]
    # One device: the command line in a fresh process (the extracted config asks for none).
    result = subprocess.run(
        [sys.executable, "-m", "multitask_moe.evaluate", f"--workdir={out}", "--splits=validation"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert TASK in result.stdout and "Traceback" not in result.stderr
    one_device = json.loads(open(os.path.join(out, "evaluation.json")).read())["tasks"]
    for other in on_meshes:
        metrics, reference = other[TASK]["validation"], one_device[TASK]["validation"]
        assert metrics["accuracy"] == reference["accuracy"]
        np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-5)


def test_export_runs_in_a_process_that_imports_only_jax_and_numpy(sliced, tmp_path):
    out, _ = sliced
    restored = lifecycle.restore(out)
    logits, _ = evaluation.task_logits(restored, 0, "validation")
    batch = next(restored.experiment.mixture.eval_batches("validation", batch_size=16))[1]
    np.savez(tmp_path / "batch.npz", inputs=batch["inputs"], mask=batch["mask"])
    script = f"""
import sys, jax, numpy as np
exported = jax.export.deserialize(open({out!r} + "/export/forward.jax", "rb").read())
params = np.load({out!r} + "/export/params.npz")
leaves = [params[f"leaf_{{i:04d}}"] for i in range(len(params.files))]
batch = np.load({str(tmp_path / "batch.npz")!r})
logits = exported.call(leaves, batch["inputs"], batch["mask"])
np.save({str(tmp_path / "logits.npy")!r}, np.asarray(logits))
assert not any(m.split(".")[0] in ("multitask_moe", "flax", "tensorflow") for m in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    exported = np.load(tmp_path / "logits.npy")
    valid = np.asarray(batch["valid"])
    np.testing.assert_allclose(exported[valid], logits[: valid.sum()], rtol=1e-5, atol=1e-5)


def test_bad_extractions_say_why_in_one_line_and_write_nothing(source, sliced, tmp_path):
    out = tmp_path / "out"
    cases = {
        "unknown task": (dict(task="no/such"), r"not one of the model's tasks; trained: \["),
        "threshold": (dict(threshold=0.0), r"threshold=0.0 must be in \(0, 100\]"),
        "router": (dict(router="half"), r"router='half' is not allowed"),
        "no usage": (dict(task="synthetic/a1"), r"no usage statistics .* --usage=data"),
        "taken": (dict(out=sliced[0]), r"already holds a model; pass --overwrite"),
    }
    for name, (changes, message) in cases.items():
        kwargs = {"workdir": source, "task": TASK, "out": str(out), **changes}
        with pytest.raises(ValueError, match=message):
            lifecycle.extract(**kwargs)
        assert not out.exists(), name
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], name
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(source, "config.json")).read())
    with pytest.raises(ValueError, match="holds no checkpoint"):
        lifecycle.extract(str(empty), TASK, str(out))
    dense = json.loads((empty / "config.json").read_text())
    dense["model"].update(moe_every=0, moa_every=0)
    (empty / "config.json").write_text(json.dumps(dense))
    with pytest.raises(ValueError, match="no MoE or MoA layer: there are no experts"):
        lifecycle.extract(str(empty), TASK, str(out))
    # The command line: one error line, status 2.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "multitask_moe.extract",
            f"--workdir={source}",
            "--task=no/such",
            f"--out={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: task 'no/such'")
    assert not out.exists()


@pytest.mark.slow  # restores and rewrites the source
def test_a_checkpoint_with_nan_is_refused_naming_the_step(source, tmp_path):
    import jax

    from multitask_moe.core.checkpoint import Checkpoints

    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    restored = lifecycle.restore(str(copy))
    params = jax.tree.map(lambda leaf: leaf * np.float32(np.nan), restored.state["params"])
    state = dict(restored.state, params=params)
    shutil.rmtree(copy / "checkpoints" / str(restored.step))
    with jax.set_mesh(restored.experiment.mesh):
        checkpoints = Checkpoints(str(copy / "checkpoints"), keep=2, enable_async=False)
        checkpoints.save(restored.step, state, restored.progress)
        checkpoints.close()
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        lifecycle.extract(str(copy), TASK, str(out))
    assert f"checkpoint step {restored.step} in {copy} holds NaN or inf in" in str(caught.value)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert os.listdir(copy / "checkpoints") == [str(restored.step)]  # left as it was
