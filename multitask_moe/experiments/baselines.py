"""Simple solutions of the same data, for reference: a logistic regression on the raw
features (pixels or table columns) of each task."""

from __future__ import annotations

import numpy as np

from multitask_moe import data
from multitask_moe.data import tasks as tasks_lib


def task_arrays(task: tasks_lib.Task, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F] float64, labels [N]) of a task's split; the train split keeps only
    the examples a limited task trains on."""
    import tensorflow_datasets as tfds

    dataset = task.builder().as_dataset(split=task.tfds_split(split))
    inputs, labels = [], []
    for example in tfds.as_numpy(dataset):
        inputs.append(np.asarray(example[task.input_key], np.float64).reshape(-1))
        labels.append(int(example[task.label_key]))
    x, y = np.stack(inputs), np.asarray(labels)
    if split == "train" and task.train_limit is not None:
        keep = task.train_subset()
        x, y = x[keep], y[keep]
    return x, y


def logistic_regression_accuracy(name: str, data_dir: str | None = None) -> float:
    """Test accuracy of an L2 logistic regression on standardized raw features, fitted on
    the task's train split (sklearn defaults, C = 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    task = data.get_task(name, data_dir)
    x_train, y_train = task_arrays(task, "train")
    x_test, y_test = task_arrays(task, "test")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(x_train, y_train)
    return float(np.mean(model.predict(x_test) == y_test))
