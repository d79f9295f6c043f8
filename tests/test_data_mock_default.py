"""tfds.testing.mock_data in its default form (no metadata on disk, nothing prepared):
TFDS image classification names still resolve and feed a mixture, as users test their
pipelines. Its own module: the module-scoped mock of test_data_tfds.py must not be active."""

from __future__ import annotations

import itertools

import pytest

from multitask_moe import data

SINGLE = {"process_index": 0, "process_count": 1}


@pytest.mark.slow  # ~20 s of tf.data pipelines for three tasks
def test_default_mock_data_feeds_a_mixture_of_tfds_names(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        cifar = data.get_task("cifar10", data_dir=str(tmp_path))
        assert (cifar.num_classes, cifar.input_shape) == (10, (32, 32, 3))
        assert cifar.splits == {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}
        mix = data.Mixture(
            {"cifar10": 1.0, "mnist": 1.0, "iris": 1.0},
            image_size=8, patch_size=4, data_dir=str(tmp_path),
        )  # fmt: skip
        batches = list(itertools.islice(mix.iterator("train", batch_size=8, seed=0, **SINGLE), 3))
        assert {int(t) for b in batches for t in b["task_id"]} == {0, 1, 2}
        assert all(b["inputs"].shape == (8,) + mix.token_shape for b in batches)
        counts = {}
        for task_id, batch in mix.eval_batches("test", batch_size=4, **SINGLE):
            counts[task_id] = counts.get(task_id, 0) + int(batch["valid"].sum())
        assert counts[0] == counts[1] == 10  # the mock's examples, each once


def test_without_a_mock_an_unprepared_name_still_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError, match="tfds build mnist"):
        data.get_task("mnist", data_dir=str(tmp_path))
