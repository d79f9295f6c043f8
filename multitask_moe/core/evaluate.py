"""Evaluation over every example of each task's eval split, and the results table.

The data pipeline pads the last batch of each task and marks real examples with `valid`;
the eval step sums only those, so each example counts exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from multitask_moe.core.step import EVAL_KEYS, sum_trees


def global_batch(
    local: Mapping[str, np.ndarray], keys: Sequence[str], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays sharded over the batch."""
    missing = [key for key in keys if key not in local]
    if missing:
        raise KeyError(f"batch lacks {missing}; it has {sorted(local)}")
    inputs = np.asarray(local["inputs"]) if "inputs" in keys else None
    if inputs is not None and np.issubdtype(inputs.dtype, np.floating):
        finite = np.isfinite(inputs).reshape(len(inputs), -1).all(axis=1)  # [B] on the host
        if not finite.all():
            rows = np.flatnonzero(~finite)
            tasks = (
                sorted(set(np.asarray(local["task_id"])[rows].tolist()))
                if "task_id" in local
                else "?"
            )
            raise ValueError(
                f"batch inputs hold NaN or inf in rows {rows[:8].tolist()} (task ids {tasks}); "
                "the examples must be finite (clean or impute the dataset's features)"
            )
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key]))
        for key in keys
    }


def evaluate(
    eval_step: Callable[[dict, dict], dict],
    state: dict,
    batches: Iterable[tuple[int, Mapping[str, np.ndarray]]],
    sharding: jax.sharding.NamedSharding,
    task_names: Sequence[str],
    sparse_layers: Sequence[str],
    prefix: str,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Runs eval_step over `batches` (data.Mixture.eval_batches); `groups` of tasks get
    their own mean accuracy (per_task_eval).

    Returns (`<prefix>/<task>/accuracy|loss` scalars, {layer: task x expert token counts
    [T, E]}). Sums stay on device until the end: one host transfer per evaluation.
    """
    total = None
    for _, batch in batches:
        total = sum_trees(total, eval_step(state, global_batch(batch, EVAL_KEYS, sharding)))
    if total is None:
        raise ValueError(f"the {prefix} split yielded no batches")
    total = jax.device_get(total)
    counts = {layer: np.asarray(total[f"{layer}/task_expert_counts"]) for layer in sparse_layers}
    return per_task_eval(total, task_names, prefix, groups), counts


def results_table(
    task_names: Sequence[str],
    task_num_classes: Sequence[int],
    task_modalities: Sequence[str],
    splits: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Per-task text table: modality, classes, chance, accuracy/loss for each split; with
    `groups` ({"seen": [...], "new": [...]}) a column naming each task's group and a mean
    row per group."""
    group_of = {name: group for group, names in (groups or {}).items() for name in names}
    header = ["task"] + (["set"] if groups else []) + ["modality", "classes", "chance"]
    for split in splits:
        header += [f"{split} acc", f"{split} loss"]
    rows = []
    chance = dict(zip(task_names, (1.0 / c for c in task_num_classes), strict=True))
    for name, classes, modality in zip(task_names, task_num_classes, task_modalities, strict=True):
        row = [name] + ([group_of.get(name, "")] if groups else [])
        row += [modality, str(classes), f"{chance[name]:.3f}"]
        for split, scalars in splits.items():
            row += [
                f"{scalars[f'{split}/{name}/accuracy']:.3f}",
                f"{scalars[f'{split}/{name}/loss']:.3f}",
            ]
        rows.append(row)
    means = [(f"{group} mean", names, f"{group}_") for group, names in (groups or {}).items()]
    means = [m for m in means if m[1]] + [("mean", task_names, "")]
    for label, names, key in means:
        row = [label] + ([""] if groups else []) + ["", ""]
        row.append(f"{np.mean([chance[name] for name in names]):.3f}")
        for split, scalars in splits.items():
            row += [f"{scalars[f'{split}/{key}mean_accuracy']:.3f}", ""]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True))
        for r in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.insert(len(lines) - len(means), lines[1])
    return "\n".join(lines)


def per_task_eval(
    sums: Mapping[str, np.ndarray],
    task_names: Sequence[str],
    prefix: str,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """Eval sums (see step.make_eval_step) -> `<prefix>/<task>/accuracy|loss` scalars,
    `<prefix>/mean_accuracy`, and `<prefix>/<group>_mean_accuracy` for each group of
    tasks (e.g. {"seen": [...], "new": [...]} of a warm-started run)."""
    out = {}
    accuracies = []
    for index, name in enumerate(task_names):
        count = float(sums["count"][index])
        if count == 0:
            raise ValueError(f"the {prefix} split of task {name!r} has no examples")
        out[f"{prefix}/{name}/accuracy"] = float(sums["correct_sum"][index]) / count
        out[f"{prefix}/{name}/loss"] = float(sums["loss_sum"][index]) / count
        out[f"{prefix}/{name}/num_examples"] = count
        accuracies.append(out[f"{prefix}/{name}/accuracy"])
    out[f"{prefix}/mean_accuracy"] = float(np.mean(accuracies))
    for group, names in (groups or {}).items():
        if names:
            out[f"{prefix}/{group}_mean_accuracy"] = float(
                np.mean([out[f"{prefix}/{name}/accuracy"] for name in names])
            )
    return out
