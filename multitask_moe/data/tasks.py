"""What a task is: the embedded tasks and `Task`, which reads a TFDS image or text
classification dataset (text as UTF-8 bytes, one token per byte: no vocabulary to
download); registry.py finds a task by name.

A `Task` names its TFDS source (builder name with config and version, data_dir, and the
TFDS split behind each of our splits "train", "validation", "test"), its label space, its
input modality and its metric, and turns a split into a tf.data.Dataset of tokens.

Data never comes from the network: embedded tasks are built locally on first use (see
`embedded.py`); a TFDS dataset must already be prepared in data_dir (download=False,
try_gcs=False), otherwise `DatasetNotPreparedError` says how to prepare it.

TFDS splits of a TFDS image dataset: train = "train"; test = "test", or "validation" when
the dataset has no "test"; validation = "validation" when it is not already the test split,
else the last VALIDATION_FRACTION of "train" (which then loses those examples). Under
tfds.testing.mock_data without metadata (its default form) split sizes are unknown: the
same cut is taken by percent ("train[:90%]", "train[90%:]") and the test split is "test".

Embedded names come first: "iris" is the embedded scikit-learn task, not TFDS's "iris"
(which is tabular and so not a TFDS task this registry accepts anyway).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from multitask_moe.data import sources
from multitask_moe.errors import check_int

SPLITS = sources.SPLITS
MODALITIES = ("image", "tabular", "text")
# Bytes of a text example the model reads (one token each); longer texts are cut.
TEXT_LENGTH = 128
VALIDATION_FRACTION = 0.1
DATA_DIR_ENV = "MTM_DATA_DIR"
_TFDS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:*+-]*")


@dataclasses.dataclass(frozen=True)
class EmbeddedSource:
    """Where an embedded task comes from: TFDS builder name, builder config, modality."""

    builder: str
    config: str
    modality: str


EMBEDDED_TASKS: dict[str, EmbeddedSource] = {
    **{
        f"digits/{config}": EmbeddedSource("mtm_digits", config, "image")
        for config in ("class", "parity", "rotated", "lowres")
    },
    **{name: EmbeddedSource("mtm_tabular", name, "tabular") for name in sources.TABULAR_LOADERS},
    **{
        f"synthetic/{name}": EmbeddedSource("mtm_synthetic", name, "tabular")
        for name in sources.SYNTHETIC_NAMES
    },
}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not in data_dir, and nothing is ever downloaded."""


def default_data_dir() -> str:
    """$MTM_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    path = os.environ.get(DATA_DIR_ENV) or os.environ.get("TFDS_DATA_DIR")
    return os.path.expanduser(path or "~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task and where its data comes from.

    Attributes:
      name: registry name ("digits/parity", "wine", "cifar10", ...).
      num_classes: labels are 0 .. num_classes - 1.
      modality: "image" (tokens are patches) or "tabular" (one token per feature).
      tfds_name: TFDS builder name with config and version, e.g. "mtm_digits/class:1.0.0".
      data_dir: where the TFDS data lives.
      splits: our split name -> TFDS split string, e.g. {"validation": "train[45000:]"}.
      input_key, label_key: the TFDS feature names of input and label.
      input_shape: (H, W, C) for images (H, W may be None), (F,) for tabular data.
      feature_mean, feature_std: train-split statistics [F] (tabular only).
      embedded: built locally by this package (True) or an external TFDS dataset.
      metric: how the task is scored.
      train_limit: train on only this many examples of the train split (None = all): a
        uniform random subset drawn with `limit_seed`, kept in stored order (`limited`).
      limit_seed: the seed of that subset.
    """

    name: str
    num_classes: int
    modality: str
    tfds_name: str
    data_dir: str
    splits: Mapping[str, str]
    input_key: str
    label_key: str
    input_shape: tuple[int | None, ...]
    feature_mean: tuple[float, ...] | None = None
    feature_std: tuple[float, ...] | None = None
    embedded: bool = False
    metric: str = "accuracy"
    train_limit: int | None = None
    limit_seed: int = 0

    def __hash__(self) -> int:  # `splits` is a dict; these fields identify a task
        return hash((self.name, self.tfds_name, self.data_dir, self.train_limit, self.limit_seed))

    def limited(self, num_examples: int, seed: int = 0) -> Task:
        """This task trained on `num_examples` examples of its train split, the same ones
        for the same seed (validation and test splits stay whole).

        Raises ValueError unless 1 <= num_examples <= the train split's size.
        """
        available = self._split_size("train")
        if (
            isinstance(num_examples, bool)
            or not isinstance(num_examples, int | np.integer)
            or not 1 <= num_examples <= available
        ):
            raise ValueError(
                f"{self.name}@{num_examples}: the example limit must be an int in "
                f"[1, {available}] (the size of its train split)"
            )
        return dataclasses.replace(self, train_limit=int(num_examples), limit_seed=int(seed))

    def _split_size(self, split: str) -> int:
        """Examples stored in the split, whatever the limit."""
        return int(self.builder().as_dataset(split=self.tfds_split(split)).cardinality())

    def train_subset(self) -> np.ndarray:
        """bool [size of the train split]: the examples a limited task trains on."""
        available = self._split_size("train")
        rng = np.random.default_rng([self.limit_seed, zlib.crc32(self.name.encode())])
        chosen = np.zeros(available, bool)
        chosen[rng.choice(available, self.train_limit, replace=False)] = True
        return chosen

    def tfds_split(self, split: str) -> str:
        """The TFDS split string behind our `split`; ValueError if the task lacks it."""
        if split not in self.splits:
            raise ValueError(
                f"Task {self.name!r} has no split {split!r}; allowed: {sorted(self.splits)}."
            )
        return self.splits[split]

    def builder(self) -> Any:
        """A TFDS builder for reading the prepared data (never downloads)."""
        import tensorflow_datasets as tfds

        if self.embedded:
            from multitask_moe.data import embedded  # noqa: F401  (registers the builders)
        return tfds.builder(self.tfds_name, data_dir=self.data_dir, try_gcs=False)

    def num_examples(self, split: str) -> int:
        """Examples in the whole split (all processes together)."""
        if split == "train" and self.train_limit is not None:
            return self.train_limit
        return self._split_size(split)

    def num_tokens(self, image_size: int, patch_size: int) -> int:
        """Tokens per example: (image_size / patch_size)^2 patches, F features, or
        TEXT_LENGTH bytes (a shorter text masks the rest)."""
        if self.modality == "image":
            return (image_size // patch_size) ** 2
        if self.modality == "text":
            return TEXT_LENGTH
        return self.input_shape[0]

    def token_dim(self, image_size: int, patch_size: int) -> int:
        """Features per token: patch_size^2 * channels, or 1 for tabular data and text."""
        del image_size
        if self.modality == "image":
            return patch_size * patch_size * self.input_shape[-1]
        return 1

    def dataset(
        self,
        split: str,
        *,
        image_size: int,
        patch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Any:
        """tf.data.Dataset of {"tokens": float32 [n, d], "label": int32 []} in stored order
        (text adds "valid": bool [n], the positions that hold a byte).

        n, d = num_tokens(...), token_dim(...). With process_count > 1 only this process's
        shard (tfds.even_splits, sizes differ by at most one) is read.
        """
        import tensorflow as tf
        import tensorflow_datasets as tfds

        from multitask_moe.data import preprocess

        check_image_layout(image_size, patch_size)
        check_process(process_index, process_count)
        tfds_split = self.tfds_split(split)
        subset = split == "train" and self.train_limit is not None
        if process_count > 1 and not subset:
            tfds_split = tfds.even_splits(tfds_split, n=process_count, drop_remainder=False)[
                process_index
            ]
        source = self.builder().as_dataset(
            split=tfds_split,
            shuffle_files=False,
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        if subset:
            # One pass over the whole split keeps the chosen examples; each process then
            # takes its share of them (the subset is small: the mixture caches it).
            chosen = tf.constant(self.train_subset())
            source = (
                source.enumerate()
                .filter(lambda index, _: tf.gather(chosen, index))
                .map(lambda _, example: example)
                .shard(process_count, process_index)
            )
        if self.modality == "image":

            def to_tokens(inputs):
                return preprocess.image_tokens(inputs, image_size, patch_size)

        elif self.modality == "text":

            def to_tokens(inputs):
                return preprocess.text_tokens(inputs, TEXT_LENGTH)

        else:
            mean = np.asarray(self.feature_mean, np.float32)
            std = np.asarray(self.feature_std, np.float32)

            def to_tokens(inputs):
                return preprocess.tabular_tokens(inputs, mean, std)

        def convert(example):
            tokens = to_tokens(example[self.input_key])
            out = {"tokens": tokens, "label": tf.cast(example[self.label_key], tf.int32)}
            if self.modality == "text":
                out["valid"] = preprocess.text_valid(tokens)
            return out

        return source.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def check_image_layout(image_size: int, patch_size: int) -> None:
    """Raise ValueError unless patch_size divides image_size (both positive ints)."""
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        check_int(value, name, 1)
    if image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must divide image_size={image_size} "
            "(patches are non-overlapping)."
        )


def check_process(process_index: int, process_count: int) -> None:
    """ValueError unless 0 <= process_index < process_count."""
    if not isinstance(process_count, int | np.integer) or process_count < 1:
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}.")
    if not isinstance(process_index, int | np.integer) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be an int in [0, {process_count}), got {process_index!r}."
        )
