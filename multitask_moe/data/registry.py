"""Finding a task by name: an embedded task (built offline on first use), or any TFDS
image or text classification dataset prepared in data_dir, with its splits, its input
and its label read from the dataset's info (tasks.py says how the splits are chosen).

    task = get_task("digits/class")        # or "cifar10", "glue/sst2", "name/config:1.0.0"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from multitask_moe.data.tasks import (
    _TFDS_NAME,
    EMBEDDED_TASKS,
    SPLITS,
    VALIDATION_FRACTION,
    DatasetNotPreparedError,
    Task,
    default_data_dir,
)


def _unknown_task_message(name: object) -> str:
    return (
        f"Unknown task {name!r}. Embedded tasks (built offline on first use): "
        f"{', '.join(EMBEDDED_TASKS)}. Any TFDS image or text classification dataset also "
        "works by its TFDS name (e.g. 'cifar10', 'mnist', 'svhn_cropped', 'imdb_reviews', "
        "'ag_news_subset', 'glue/sst2', optionally 'name/config:version') once it is "
        "prepared in data_dir."
    )


def get_task(name: str, data_dir: str | None = None) -> Task:
    """The task called `name`: an embedded task (built on first use) or a TFDS dataset.

    Args:
      name: a key of EMBEDDED_TASKS or a TFDS image or text classification dataset name.
      data_dir: TFDS data directory (local path or gs://...); default `default_data_dir()`.

    Raises:
      ValueError: unknown name, or a TFDS dataset that is not image or text classification.
      DatasetNotPreparedError: a TFDS dataset that is not prepared in data_dir.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if not isinstance(name, str) or not _TFDS_NAME.fullmatch(name):
        raise ValueError(_unknown_task_message(name))
    if name in EMBEDDED_TASKS:
        return _embedded_task(name, data_dir)
    return _tfds_task(name, data_dir)


def _embedded_task(name: str, data_dir: str) -> Task:
    from multitask_moe.data import embedded

    spec = EMBEDDED_TASKS[name]
    embedded.prepare(spec.builder, spec.config, data_dir)
    builder = embedded.BUILDERS[spec.builder](config=spec.config, data_dir=data_dir)
    info = builder.info
    input_key, label_key = info.supervised_keys
    mean = std = None
    if spec.modality == "tabular":
        mean, std = map(tuple, builder.standardization())
    return Task(
        name=name,
        num_classes=info.features[label_key].num_classes,
        modality=spec.modality,
        tfds_name=f"{spec.builder}/{spec.config}:{builder.version}",
        data_dir=data_dir,
        splits={split: split for split in SPLITS},
        input_key=input_key,
        label_key=label_key,
        input_shape=tuple(info.features[input_key].shape),
        feature_mean=mean,
        feature_std=std,
        embedded=True,
    )


def _tfds_task(name: str, data_dir: str) -> Task:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(_unknown_task_message(name)) from error
    if not builder.is_prepared() and not _serves_unprepared(builder):
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, and "
            "multitask_moe never downloads (download=False, try_gcs=False). Prepare it once "
            "on a machine with network access:\n"
            f"  tfds build {builder.name} --data_dir={data_dir}\n"
            "or in Python:\n"
            f"  tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare()\n"
            "then copy that data_dir here (or point data_dir / $MTM_DATA_DIR at it)."
        )
    info = builder.info
    features = info.features
    input_key, label_key = _input_and_label(name, info)
    if isinstance(features[input_key], tfds.features.Text):
        modality, shape = "text", ()
    else:
        modality, shape = "image", tuple(features[input_key].shape)
        if shape[-1] is None:
            raise ValueError(f"TFDS dataset {name!r} has images with unknown channels: {shape}.")
        if features[input_key].np_dtype != np.uint8:  # the [-1, 1] scaling assumes 0..255
            raise ValueError(
                f"TFDS dataset {name!r} has {features[input_key].np_dtype} images; only uint8 "
                "images are supported."
            )
    config = f"/{builder.builder_config.name}" if builder.builder_config else ""
    return Task(
        name=name,
        num_classes=features[label_key].num_classes,
        modality=modality,
        tfds_name=f"{builder.name}{config}:{builder.version}",
        data_dir=data_dir,
        splits=_tfds_splits(name, _labeled_splits(builder.name, info.splits))
        if info.splits
        else _unsized_splits(),
        input_key=input_key,
        label_key=label_key,
        input_shape=shape,
    )


# Datasets whose "test" split has no labels (GLUE's are -1): their validation split
# serves as the test split, and validation comes out of train.
UNLABELED_TEST = ("glue",)


def _labeled_splits(builder_name: str, splits: Mapping[str, Any]) -> Mapping[str, Any]:
    if builder_name in UNLABELED_TEST:
        return {name: info for name, info in splits.items() if not name.startswith("test")}
    return splits


def _input_and_label(name: str, info) -> tuple[str, str]:
    """The (input, label) feature names of a TFDS classification dataset: its supervised
    keys, else "image" / the first Text feature and "label". The input must be an Image
    or a Text feature, the label a ClassLabel."""
    import tensorflow_datasets as tfds

    features = info.features
    keys = info.supervised_keys
    if _is_key_pair(keys):
        input_key, label_key = keys
    else:
        texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
        input_key = "image" if "image" in features or not texts else texts[0]
        label_key = "label"
    text = input_key in features and isinstance(features[input_key], tfds.features.Text)
    if text and features[input_key].encoder:
        raise ValueError(
            f"TFDS dataset {name!r} stores its text {input_key!r} as subword ids; use a "
            "config that stores plain text (e.g. imdb_reviews/plain_text): text is read as "
            "UTF-8 bytes"
        )
    if not (
        input_key in features
        and label_key in features
        and isinstance(features[input_key], tfds.features.Image | tfds.features.Text)
        and isinstance(features[label_key], tfds.features.ClassLabel)
    ):
        raise ValueError(
            f"TFDS dataset {name!r} is not an image or text classification dataset: need an "
            f"Image or Text feature {input_key!r} and a ClassLabel feature {label_key!r}, "
            f"got {features}."
        )
    return input_key, label_key


def _serves_unprepared(builder) -> bool:
    """True when a builder with nothing in data_dir still serves examples: under
    tfds.testing.mock_data in its default form (no metadata on disk), reading is replaced
    by generated examples, which is how users test pipelines without the data."""
    try:
        builder.as_dataset(split="train")
    except Exception:  # what TFDS raises for missing data varies by version and reader
        return False
    return True


def _unsized_splits() -> dict[str, str]:
    """Our splits when the split sizes are unknown (a mocked dataset without metadata):
    the last VALIDATION_FRACTION of "train" by percent, and "test"."""
    cut = round(100 * (1 - VALIDATION_FRACTION))
    return {"train": f"train[:{cut}%]", "validation": f"train[{cut}%:]", "test": "test"}


def _is_key_pair(keys: object) -> bool:
    return isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)


def _tfds_splits(name: str, available: Mapping[str, Any]) -> dict[str, str]:
    """Our splits -> TFDS split strings (rules in the module docstring)."""
    names = set(available)
    if "train" not in names:
        raise ValueError(f"TFDS dataset {name!r} has no 'train' split (splits: {sorted(names)}).")
    splits = {"train": "train"}
    test = "test" if "test" in names else ("validation" if "validation" in names else None)
    if "validation" in names and test != "validation":
        splits["validation"] = "validation"
    else:
        n = available["train"].num_examples
        held_out = max(1, round(VALIDATION_FRACTION * n))
        if n - held_out < 1:
            raise ValueError(f"TFDS dataset {name!r}: {n} train examples cannot give a validation.")
        splits["train"] = f"train[:{n - held_out}]"
        splits["validation"] = f"train[{n - held_out}:]"
    if test is not None:
        splits["test"] = test
    return splits
