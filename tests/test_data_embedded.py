"""Embedded TFDS builders and the task registry: offline builds, layout, safety, errors."""

from __future__ import annotations

import collections
import os
import socket
import threading

import numpy as np
import pytest
from test_data_support import (  # noqa: F401
    data_dir,
    image_tokens_reference,
    match_rows,
    row_keys,
)

from multitask_moe import data
from multitask_moe.data import embedded, sources

EXPECTED = {  # name: (num_classes, modality, input_shape, split sizes)
    "digits/class": (10, "image", (8, 8, 1), sources.DIGITS_SPLIT_SIZES),
    "digits/parity": (2, "image", (8, 8, 1), sources.DIGITS_SPLIT_SIZES),
    "digits/rotated": (10, "image", (8, 8, 1), sources.DIGITS_SPLIT_SIZES),
    "digits/lowres": (10, "image", (8, 8, 1), sources.LOWRES_SPLIT_SIZES),
    "wine": (3, "tabular", (13,), sources.TABULAR_SPLIT_SIZES["wine"]),
    "breast_cancer": (2, "tabular", (30,), sources.TABULAR_SPLIT_SIZES["breast_cancer"]),
    "iris": (3, "tabular", (4,), sources.TABULAR_SPLIT_SIZES["iris"]),
    **{
        f"synthetic/{name}": (
            4,
            "tabular",
            (16,),
            dict(zip(sources.SPLITS, (2000, 500, 1000), strict=True)),
        )
        for name in sources.SYNTHETIC_NAMES
    },
}


@pytest.fixture(scope="module")
def all_tasks(data_dir):  # noqa: F811
    """Every embedded task, built with the network switched off."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "create_connection", no_network)
        return {name: data.get_task(name, data_dir=data_dir) for name in data.EMBEDDED_TASKS}


def _read(task: data.Task, split: str) -> dict[str, np.ndarray]:
    import tensorflow_datasets as tfds

    return tfds.as_numpy(task.builder().as_dataset(split=split, batch_size=-1))


def test_registry_lists_every_documented_task():
    assert set(data.EMBEDDED_TASKS) == set(EXPECTED)


def test_embedded_tasks_build_offline_with_documented_layout(all_tasks):
    for name, (num_classes, modality, shape, sizes) in EXPECTED.items():
        task = all_tasks[name]
        assert (task.name, task.num_classes, task.modality) == (name, num_classes, modality)
        assert task.input_shape == shape and task.metric == "accuracy" and task.embedded
        assert task.splits == {"train": "train", "validation": "validation", "test": "test"}
        info = task.builder().info
        assert {s: info.splits[s].num_examples for s in sources.SPLITS} == sizes, name
    assert all_tasks["digits/parity"].tfds_name == "mtm_digits/parity:1.0.0"
    assert EXPECTED["digits/lowres"][3]["train"] <= 50


def test_built_digits_hold_the_source_images(all_tasks):
    for split in ("train", "test"):
        stored = _read(all_tasks["digits/rotated"], split)
        expected = sources.digits_splits("rotated")[split]
        found = zip(row_keys(stored["image"]), stored["label"].tolist(), strict=True)
        wanted = zip(row_keys(expected.inputs), expected.labels.tolist(), strict=True)
        assert collections.Counter(found) == collections.Counter(wanted)


def test_tabular_standardization_uses_train_statistics(all_tasks):
    task = all_tasks["wine"]
    train = sources.tabular_splits("wine")["train"].inputs.astype(np.float64)
    np.testing.assert_allclose(task.feature_mean, train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(task.feature_std, train.std(axis=0), rtol=1e-5)
    stored = _read(task, "validation")
    expected = sources.tabular_splits("wine")["validation"]
    assert sorted(match_rows(stored["features"], expected.inputs, atol=0)) == list(range(36))


def test_task_tokens_for_images_and_tables(all_tasks):
    import tensorflow_datasets as tfds

    task = all_tasks["digits/class"]
    raw = sources.digits_splits("class")["validation"]
    for image_size in (8, 16):  # 16: bilinear upsampling first
        tokens = tfds.as_numpy(
            task.dataset("validation", image_size=image_size, patch_size=4).batch(1000)
        )
        batch = next(iter(tokens))
        assert batch["tokens"].shape == (179, (image_size // 4) ** 2, 16)
        reference = np.stack([image_tokens_reference(x, image_size, 4) for x in raw.inputs])
        assert sorted(match_rows(batch["tokens"], reference, atol=1e-5)) == list(range(179))
        assert batch["tokens"].min() >= -1 and batch["tokens"].max() <= 1
    iris = all_tasks["iris"]
    batch = next(iter(tfds.as_numpy(iris.dataset("test", image_size=8, patch_size=4).batch(99))))
    assert batch["tokens"].shape == (30, 4, 1)
    features = sources.tabular_splits("iris")["test"].inputs
    expected = (features - np.asarray(iris.feature_mean)) / np.asarray(iris.feature_std)
    assert sorted(match_rows(batch["tokens"][..., 0], expected, atol=1e-5)) == list(range(30))


def test_second_build_is_a_no_op(all_tasks, data_dir):  # noqa: F811
    root = os.path.join(data_dir, "mtm_tabular", "iris")
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, ps in os.walk(root) for p in ps}
    assert embedded.prepare("mtm_tabular", "iris", data_dir) is False
    again = data.get_task("iris", data_dir=data_dir)
    assert again == all_tasks["iris"] and len({again, all_tasks["iris"]}) == 1
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, ps in os.walk(root) for p in ps}
    assert before == after and before


def test_concurrent_builds_build_once(tmp_path, monkeypatch):
    barrier, results, errors, generations = threading.Barrier(2), [], [], []
    original = embedded.MtmTabular._split_generators

    def counted(self, dl_manager):
        generations.append(1)
        return original(self, dl_manager)

    monkeypatch.setattr(embedded.MtmTabular, "_split_generators", counted)

    def build():
        barrier.wait()
        try:
            results.append(embedded.prepare("mtm_tabular", "iris", str(tmp_path)))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(results) == [False, True]
    assert len(generations) == 1  # the second builder waited and then reused the data
    task = data.get_task("iris", data_dir=str(tmp_path))
    assert len(_read(task, "train")["label"]) == 90
    leftovers = [d for d, _, _ in os.walk(tmp_path) if "incomplete" in os.path.basename(d)]
    assert not leftovers


def test_failed_build_leaves_nothing_readable(tmp_path, monkeypatch):
    def broken(self, split):
        for i in range(5):
            yield i, {"features": split.inputs[i], "label": int(split.labels[i])}
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(embedded.MtmTabular, "_generate_examples", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        embedded.prepare("mtm_tabular", "wine", str(tmp_path))
    assert not embedded.MtmTabular(config="wine", data_dir=str(tmp_path)).is_prepared()
    assert not os.path.exists(tmp_path / "mtm_tabular" / "wine" / "1.0.0")
    monkeypatch.undo()
    assert embedded.prepare("mtm_tabular", "wine", str(tmp_path)) is True
    assert len(_read(data.get_task("wine", data_dir=str(tmp_path)), "test")["label"]) == 36


def test_a_tfds_name_reaches_a_prepared_builder(all_tasks, data_dir):  # noqa: F811
    # The generic TFDS path, on a real prepared dataset: the embedded builder by TFDS name.
    task = data.get_task("mtm_digits/parity", data_dir=data_dir)
    assert (task.modality, task.num_classes, task.embedded) == ("image", 2, False)
    assert task.splits == {"train": "train", "validation": "validation", "test": "test"}
    with pytest.raises(ValueError, match="not an image or text classification dataset"):
        data.get_task("mtm_tabular/wine", data_dir=data_dir)


def test_unknown_task_lists_embedded_tasks_and_tfds_usage(tmp_path):
    for name in ("no_such_dataset_xyz", "digits/clas", "", "bad name!"):
        with pytest.raises(ValueError) as error:
            data.get_task(name, data_dir=str(tmp_path))
        message = str(error.value)
        assert repr(name) in message and "digits/parity" in message and "synthetic/b2" in message
        assert "TFDS" in message and "cifar10" in message


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.get_task("mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert f"tfds build mnist --data_dir={tmp_path}" in message
    assert "download_and_prepare()" in message and "never downloads" in message
    assert not os.listdir(tmp_path)  # nothing was fetched or written


def test_bad_split_and_layout_arguments(all_tasks):
    task = all_tasks["digits/class"]
    with pytest.raises(ValueError, match=r"no split 'dev'.*'test', 'train', 'validation'"):
        task.dataset("dev", image_size=8, patch_size=4)
    with pytest.raises(ValueError, match="patch_size=3 must divide image_size=8"):
        task.dataset("train", image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="image_size=0 must be an int >= 1"):
        task.dataset("train", image_size=0, patch_size=4)
    with pytest.raises(ValueError, match=r"process_index must be an int in \[0, 2\)"):
        task.dataset("train", image_size=8, patch_size=4, process_index=2, process_count=2)


def test_default_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "mine"))
    assert data.default_data_dir() == str(tmp_path / "mine")
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert data.default_data_dir() == os.path.expanduser("~/tensorflow_datasets")


def test_a_build_prints_one_line_and_never_downloading(tmp_path, capfd):
    from tensorflow_datasets.core.utils import tqdm_utils

    bars = tqdm_utils._active
    assert embedded.prepare("mtm_tabular", "iris", str(tmp_path)) is True
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        line for line in out.splitlines() if line.startswith("Built the embedded dataset")
    ]
    assert len(out.splitlines()) == 1 and "mtm_tabular/iris" in out
    assert "Downloading" not in out + err and "Variant folder" not in err
    assert "examples/s" not in err  # no TFDS progress bar
    assert tqdm_utils._active == bars  # the caller's progress-bar setting is back
