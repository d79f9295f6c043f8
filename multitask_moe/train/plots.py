"""PNG plots written at the end of a run: learning curves and routing heatmaps.

plots.learning_curves(history, task_names, "workdir/plots/learning_curves.png")
plots.routing_heatmap(counts [T, E], task_names, "block1/moe", "workdir/plots/...png")
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on a TPU VM or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _series(history: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in history:
        value = record.get(key)
        if isinstance(value, int | float):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def learning_curves(history: Sequence[Mapping], task_names: Sequence[str], path: str) -> str:
    """Per-task train loss and eval accuracy against the step, one line per task."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in task_names:
        steps, values = _series(history, f"train/{name}/loss")
        loss_ax.plot(steps, values, label=name)
        steps, values = _series(history, f"eval/{name}/accuracy")
        acc_ax.plot(steps, values, marker="o", label=name)
    loss_ax.set(title="train loss per task", xlabel="step", ylabel="cross-entropy")
    loss_ax.set_yscale("log")
    acc_ax.set(title="eval accuracy per task", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    acc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def routing_heatmap(
    counts: np.ndarray,
    task_names: Sequence[str],
    layer: str,
    path: str,
    what: str = "share of each task's tokens per expert",
) -> str:
    """Task x expert shares of one sparse layer (rows sum to 1): routed tokens of an
    evaluation, or the training usage EMA (`what` says which in the title)."""
    counts = np.asarray(counts, np.float64)  # [T, E]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
    num_tasks, num_experts = shares.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * num_experts, 1.0 + 0.4 * num_tasks))
    image = ax.imshow(shares, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_tasks), labels=list(task_names), fontsize=8)
    ax.set(xlabel="expert", title=f"{layer}: {what}")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    """Writes the PNG through tf.io.gfile (local path or gs://)."""
    import tensorflow as tf

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path
