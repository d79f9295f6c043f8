"""Metrics: accumulation of per-step train metrics, and writers (metrics.jsonl, TensorBoard).

Files go through tf.io.gfile, so a workdir may be a local path or a gs:// bucket (where a
TPU pod keeps its runs). Keys are flat strings: `train/loss`, `train/<task>/loss`,
`train/aux/<loss>`, `train/<layer>/dropped_fraction`, `train/<layer>/expert_load_max`,
`steps_per_sec`, `examples_per_sec`, `eval/<task>/accuracy`, ... Only process 0 writes
(CLU's habit): the values are global already (computed over the global batch).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"


class TrainMeter:
    """Sums the host copies of per-step metrics over one logging interval."""

    def __init__(self, task_names: Sequence[str], sparse_layers: Sequence[str]):
        self.task_names = list(task_names)
        self.sparse_layers = list(sparse_layers)
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.sums: dict[str, np.ndarray] = {}

    def add(self, metrics: Mapping[str, np.ndarray]) -> None:
        self.steps += 1
        for key, value in metrics.items():
            value = np.asarray(value, np.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def summary(self) -> dict[str, float]:
        """Interval means as flat `train/...` scalars (empty if no step was added)."""
        if not self.steps:
            return {}
        mean = {key: value / self.steps for key, value in self.sums.items()}
        out = {
            "train/loss": mean["loss"],
            "train/task_loss": mean["task_loss"],
            "train/grad_norm": mean["grad_norm"],
            "train/learning_rate": mean["learning_rate"],
            "train/nonfinite_steps": self.sums["nonfinite"],
        }
        # Per-task loss: mean over every example of the task seen in the interval.
        counts = self.sums["task_count"]
        for index, name in enumerate(self.task_names):
            if counts[index] > 0:
                out[f"train/{name}/loss"] = self.sums["task_loss_sum"][index] / counts[index]
        for key, value in mean.items():
            if key.startswith("aux/"):
                out[f"train/{key}"] = value
        for index, name in enumerate(self.task_names):
            if "task_loss_scale" in mean:
                out[f"train/{name}/loss_scale"] = mean["task_loss_scale"][index]
            for layer in self.sparse_layers:
                if f"{layer}/effective_experts" in mean:
                    out[f"train/{layer}/{name}/effective_experts"] = mean[
                        f"{layer}/effective_experts"
                    ][index]
        dropped = []
        for layer in self.sparse_layers:
            out[f"train/{layer}/dropped_fraction"] = mean[f"{layer}/dropped_fraction"]
            out[f"train/{layer}/router_entropy"] = mean[f"{layer}/router_entropy"]
            load = self.sums[f"{layer}/expert_counts"]
            # max share x E: 1.0 when every expert gets the same number of tokens.
            out[f"train/{layer}/expert_load_max"] = float(load.max() / load.sum() * load.size)
            dropped.append(out[f"train/{layer}/dropped_fraction"])
        if dropped:
            out["train/dropped_fraction"] = float(np.mean(dropped))
        return {key: float(value) for key, value in out.items()}


class MetricWriter:
    """Appends scalars to workdir/metrics.jsonl and TensorBoard event files.

    With enabled=False (processes other than 0) every method does nothing.
    """

    def __init__(self, workdir: str, *, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            self._tb = _TensorBoard(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run rewrites what came after its checkpoint."""
        gfile = _gfile()
        if not self.enabled or not gfile.exists(self.path):
            return
        kept = [
            record for record in read_history(os.path.dirname(self.path)) if record["step"] <= step
        ]
        tmp = self.path + ".tmp"
        with gfile.GFile(tmp, "w") as f:
            f.write("".join(json.dumps(record) + "\n" for record in kept))
        gfile.rename(tmp, self.path, overwrite=True)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        record = {"step": int(step)}
        # JSON has no NaN/inf; they are written as strings so a bad step stays visible.
        record.update(
            {
                key: (float(value) if math.isfinite(value) else str(value))
                for key, value in scalars.items()
            }
        )
        with _gfile().GFile(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._tb.write(step, scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_history(workdir: str) -> list[dict]:
    """All records of workdir/metrics.jsonl, in order."""
    path = os.path.join(workdir, METRICS_FILE)
    gfile = _gfile()
    if not gfile.exists(path):
        return []
    with gfile.GFile(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


class _TensorBoard:
    """Scalar event files via tf.summary's generic `write` op.

    tf.summary.scalar needs the tensorboard package at write time; `write` with the
    scalars plugin's metadata produces the same records from TensorFlow alone, so event
    files are written whether or not TensorBoard itself is installed.
    """

    def __init__(self, logdir: str):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._writer = tf.summary.create_file_writer(logdir)
        self._metadata = summary_pb2.SummaryMetadata()
        self._metadata.plugin_data.plugin_name = "scalars"
        self._metadata.data_class = summary_pb2.DATA_CLASS_SCALAR

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        tf = self._tf
        with self._writer.as_default():
            for key, value in scalars.items():
                tf.summary.write(
                    key,
                    tf.constant(float(value), tf.float32),
                    step=int(step),
                    metadata=self._metadata,
                )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
