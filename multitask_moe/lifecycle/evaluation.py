"""Evaluating a trained directory, and per-example predictions of one task.

    python -m multitask_moe.evaluate --workdir=DIR [--splits=validation,test]

works on a training workdir and on an extracted model alike (workdir.restore), prints
the per-task table and writes DIR/evaluation.json: {task: {split: {accuracy, loss,
num_examples}}}.

Shape legend: B batch, C classes (the model's largest), N examples of a split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from multitask_moe import parallel
from multitask_moe.core import evaluate as evaluate_lib
from multitask_moe.core import files
from multitask_moe.core.step import EVAL_KEYS
from multitask_moe.core.workdir import Restored, restore

EVALUATION_FILE = "evaluation.json"


def evaluate_splits(restored: Restored, splits: Sequence[str]) -> dict[str, dict[str, float]]:
    """{split: `<split>/<task>/accuracy|loss|num_examples` and `<split>/mean_accuracy`}."""
    experiment = restored.experiment
    sharding = parallel.batch_sharding(experiment.mesh)
    out = {}
    with jax.set_mesh(experiment.mesh):
        for split in splits:
            batches = experiment.mixture.eval_batches(
                split, batch_size=experiment.config.eval_batch_size
            )
            out[split], _ = evaluate_lib.evaluate(
                experiment.eval_step,
                restored.state,
                batches,
                sharding,
                experiment.task_names,
                experiment.model.spec.sparse_layers,
                split,
            )
    return out


def evaluate_workdir(
    directory: str,
    splits: Sequence[str] = ("validation", "test"),
    *,
    mesh: dict[str, int] | None = None,
    write: bool = True,
) -> dict[str, dict[str, dict[str, float]]]:
    """Restores `directory`'s latest checkpoint and evaluates every task on `splits`.

    Returns {task: {split: {"accuracy", "loss", "num_examples"}}}; writes it to
    directory/evaluation.json (process 0) and prints the table when `write`.
    """
    restored = restore(directory, mesh=mesh)
    experiment = restored.experiment
    scalars = evaluate_splits(restored, splits)
    results = {
        task: {
            split: {
                metric: scalars[split][f"{split}/{task}/{metric}"]
                for metric in ("accuracy", "loss", "num_examples")
            }
            for split in splits
        }
        for task in experiment.task_names
    }
    if write and jax.process_index() == 0:
        files.write_json(
            os.path.join(directory, EVALUATION_FILE), {"step": restored.step, "tasks": results}
        )
        table = evaluate_lib.results_table(
            experiment.task_names,
            experiment.task_num_classes,
            experiment.task_modalities,
            scalars,
        )
        print(f"{directory}, step {restored.step}\n{table}", flush=True)
    return results


def evaluation_model(restored: Restored):
    """The restored model with host (numpy) values: for reading its tables."""
    spec = restored.experiment.model.spec
    params, model_state = jax.device_get((restored.state["params"], restored.state["model_state"]))
    return nnx.merge(spec.graphdef, params, model_state)


def task_logits(restored: Restored, task_id: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C] float32, labels [N]) of every example of one task's split, in the
    pipeline's order (the same on any model fed by a mixture with the same layout)."""
    experiment = restored.experiment
    graphdef = experiment.model.spec.graphdef
    sharding = parallel.batch_sharding(experiment.mesh)

    @jax.jit
    def forward(state, batch):
        model = nnx.merge(graphdef, state["params"], state["model_state"])
        logits, _ = model(batch["inputs"], batch["mask"], batch["task_id"], deterministic=True)
        return logits

    logits, labels = [], []
    with jax.set_mesh(experiment.mesh):
        for _, batch in experiment.mixture.eval_batches(
            split, batch_size=experiment.config.eval_batch_size, task_ids=[task_id]
        ):
            arrays = evaluate_lib.global_batch(batch, EVAL_KEYS, sharding)
            valid = np.asarray(batch["valid"])
            logits.append(np.asarray(jax.device_get(forward(restored.state, arrays)))[valid])
            labels.append(np.asarray(batch["label"])[valid])
    return np.concatenate(logits), np.concatenate(labels)
