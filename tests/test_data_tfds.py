"""Real TFDS dataset names (cifar10, mnist) through the registry and a mixture, mocked."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest
from test_data_support import image_tokens_reference

from multitask_moe import data
from multitask_moe.data import registry

SIZES = {"cifar10": {"train": 50000, "test": 10000}, "mnist": {"train": 60000, "test": 10000}}
NUM_MOCK_EXAMPLES = 12
SINGLE = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def mocked(tmp_path_factory):
    """tfds.testing.mock_data over real metadata (split names and sizes) of cifar10 and mnist.

    The metadata directory holds dataset_info.json as a prepared dataset would, so the
    registry sees the real split names; the examples are TFDS's deterministic fakes.
    """
    import tensorflow_datasets as tfds

    meta = tmp_path_factory.mktemp("tfds_metadata")
    for name, sizes in SIZES.items():
        builder = tfds.builder(name, data_dir=str(meta))
        splits = [
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[n],
                num_bytes=0,
                filename_template=tfds.core.naming.ShardedFileTemplate(
                    data_dir=builder.data_path,
                    dataset_name=name,
                    split=split,
                    filetype_suffix="tfrecord",
                ),
            )
            for split, n in sizes.items()
        ]
        builder.info.set_splits(tfds.core.SplitDict(splits))
        builder.data_path.mkdir(parents=True)
        builder.info.write_to_directory(builder.data_path)
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES, policy=policy, data_dir=str(meta)):
        yield


def _raw(name: str, split: str) -> dict[str, np.ndarray]:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name)
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


def test_registry_resolves_tfds_image_datasets(mocked):
    cifar = data.get_task("cifar10", data_dir="/unused/under/mock")
    assert (cifar.num_classes, cifar.modality, cifar.input_shape) == (10, "image", (32, 32, 3))
    assert cifar.splits == {"train": "train[:45000]", "validation": "train[45000:]", "test": "test"}
    assert cifar.tfds_name.startswith("cifar10:") and not cifar.embedded
    mnist = data.get_task("mnist", data_dir="/unused/under/mock")
    assert (mnist.num_classes, mnist.input_shape) == (10, (28, 28, 1))
    assert (
        mnist.splits["train"] == "train[:54000]" and mnist.splits["validation"] == "train[54000:]"
    )
    assert mnist.token_dim(16, 4) == 16 and cifar.token_dim(16, 4) == 48


def test_mixture_of_tfds_tasks_matches_reference_tokens(mocked):
    mix = data.Mixture({"cifar10": 1.0, "mnist": 1.0}, image_size=32, patch_size=8, data_dir="/x")
    assert mix.token_shape == (16, 192)  # 4x4 patches of 8*8*3 (cifar) and 8*8*1 (mnist)
    batches = list(itertools.islice(mix.iterator("train", batch_size=16, seed=0, **SINGLE), 4))
    references = {}
    for task_id, (name, width) in enumerate((("cifar10", 192), ("mnist", 64))):
        raw = _raw(name, mix.tasks[task_id].splits["train"])
        tokens = np.stack([image_tokens_reference(x, 32, 8) for x in raw["image"]])
        references[task_id] = (tokens, raw["label"], width)
    for batch in batches:
        assert batch["inputs"].shape == (16, 16, 192)
        for inputs, label, task_id in zip(
            batch["inputs"], batch["label"], batch["task_id"], strict=True
        ):
            tokens, labels, width = references[int(task_id)]
            assert not inputs[:, width:].any()  # mnist tokens padded from 64 to 192 features
            distance = np.abs(tokens - inputs[:, :width]).max(axis=(1, 2))
            best = int(np.argmin(distance))
            assert distance[best] < 1e-4 and labels[best] == label
    assert {int(t) for b in batches for t in b["task_id"]} == {0, 1}


def test_downsampled_tfds_images_stay_in_range(mocked):
    mix = data.Mixture(["mnist"], image_size=16, patch_size=4, data_dir="/x")
    batch = next(mix.iterator("train", batch_size=8, **SINGLE))
    assert batch["inputs"].shape == (8, 16, 16)
    assert -1.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
    assert batch["inputs"].std() > 0.1  # real content, not zeros


def test_eval_of_tfds_tasks_counts_every_example_once(mocked):
    mix = data.Mixture(["cifar10", "mnist"], image_size=8, patch_size=4, data_dir="/x")
    counts = {}
    for task_id, batch in mix.eval_batches("test", batch_size=5, **SINGLE):
        counts[task_id] = counts.get(task_id, 0) + int(batch["valid"].sum())
        assert batch["inputs"].shape == (5, 4, 48)
    assert counts == {0: NUM_MOCK_EXAMPLES, 1: NUM_MOCK_EXAMPLES}


def test_tfds_split_rules():
    def available(**sizes):
        return {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}

    assert registry._tfds_splits("x", available(train=10, validation=3, test=4)) == {
        "train": "train",
        "validation": "validation",
        "test": "test",
    }
    # No test split: validation becomes the test split and validation is carved from train.
    assert registry._tfds_splits("x", available(train=1000, validation=50)) == {
        "train": "train[:900]",
        "validation": "train[900:]",
        "test": "validation",
    }
    assert registry._tfds_splits("x", available(train=7)) == {
        "train": "train[:6]",
        "validation": "train[6:]",
    }
    with pytest.raises(ValueError, match="has no 'train' split"):
        registry._tfds_splits("x", available(test=5))
