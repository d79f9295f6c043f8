"""Mixtures: batch layout against references, rates, epochs, resumption, sharding, eval."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from test_data_support import data_dir, match_rows, patches_reference  # noqa: F401

from multitask_moe import data
from multitask_moe.data import sources

TASKS = {"digits/class": 1.0, "digits/lowres": 1.0, "wine": 1.0, "iris": 0.0, "synthetic/a0": 1.0}
NAMES = list(TASKS)
L, P = 16, 16  # image 8 / patch 4 -> 4 tokens of 16; wine 13, iris 4, synthetic 16 features
SINGLE = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def mix(data_dir):  # noqa: F811
    return data.Mixture(TASKS, rate="explicit", image_size=8, patch_size=4, data_dir=data_dir)


def _reference(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent expected examples of a task: inputs [N, L, P] and labels [N]."""
    kind = data.EMBEDDED_TASKS[name]
    if kind.builder == "mtm_digits":
        raw = sources.digits_splits(kind.config)[split]
        tokens = [patches_reference(x.astype(np.float64) / 127.5 - 1.0, 4) for x in raw.inputs]
    else:
        load = sources.tabular_splits if kind.builder == "mtm_tabular" else sources.synthetic_splits
        splits = load(kind.config)
        train = splits["train"].inputs.astype(np.float64)
        raw = splits[split]
        standardized = (raw.inputs - train.mean(0)) / train.std(0)
        tokens = [x[:, None] for x in standardized]
    inputs = np.zeros((len(tokens), L, P))
    for i, t in enumerate(tokens):
        inputs[i, : t.shape[0], : t.shape[1]] = t
    return inputs, raw.labels


def _with_labels(inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows that only match when the labels match too."""
    flat = np.asarray(inputs, np.float64).reshape(len(inputs), -1)
    return np.concatenate([flat, 1000.0 * np.asarray(labels)[:, None]], axis=1)


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_layout(mix):
    assert [t.name for t in mix.tasks] == NAMES
    assert mix.token_shape == (L, P)
    np.testing.assert_allclose(mix.rates, [0.25, 0.25, 0.25, 0.0, 0.25])
    batch = next(mix.iterator("train", batch_size=32, seed=0, **SINGLE))
    assert sorted(batch) == ["inputs", "label", "mask", "task_id"]
    assert batch["inputs"].shape == (32, L, P) and batch["inputs"].dtype == np.float32
    assert batch["mask"].shape == (32, L) and batch["mask"].dtype == bool
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["task_id"].shape == (32,) and batch["task_id"].dtype == np.int32
    tokens = {0: 4, 1: 4, 2: 13, 4: 16}
    width = {0: 16, 1: 16, 2: 1, 4: 1}
    for inputs, mask, task_id in zip(batch["inputs"], batch["mask"], batch["task_id"], strict=True):
        n, d = tokens[int(task_id)], width[int(task_id)]
        np.testing.assert_array_equal(mask, np.arange(L) < n)
        assert not inputs[n:].any() and not inputs[:, d:].any()  # zero padding


def test_train_examples_equal_independent_references(mix):
    batch = _concat(_take(mix.iterator("train", batch_size=64, seed=3, **SINGLE), 12))
    for task_id, name in enumerate(NAMES):
        chosen = batch["task_id"] == task_id
        if name == "iris":
            assert not chosen.any()  # weight 0: never sampled
            continue
        assert chosen.sum() > 100
        inputs, labels = _reference(name, "train")
        found = _with_labels(batch["inputs"][chosen], batch["label"][chosen])
        match_rows(found[: len(inputs)], _with_labels(inputs, labels), atol=1e-4)


def test_empirical_task_frequencies_match_rates(mix):
    task_ids = _concat(_take(mix.iterator("train", batch_size=64, seed=1, **SINGLE), 150))
    n = task_ids["task_id"].size
    freq = np.bincount(task_ids["task_id"], minlength=5) / n
    sigma = np.sqrt(mix.rates * (1 - mix.rates) / n)
    assert np.all(np.abs(freq - mix.rates) <= 5 * sigma), (freq, mix.rates)


def test_each_epoch_of_a_task_is_a_shuffle_of_all_its_examples(mix):
    batches = _concat(_take(mix.iterator("train", batch_size=32, seed=0, **SINGLE), 40))
    lowres = batches["inputs"][batches["task_id"] == 1][:150]  # 3 epochs of the 50 examples
    reference, labels = _reference("digits/lowres", "train")
    epochs = [match_rows(lowres[i : i + 50], reference) for i in (0, 50, 100)]
    for order in epochs:
        assert sorted(order) == list(range(50))  # each example exactly once per epoch
    orders = [tuple(order.tolist()) for order in epochs]
    assert len(set(orders)) == 3  # reshuffled: no two epochs in the same order


def test_same_seed_same_batches_other_seed_other_batches(mix):
    first = _take(mix.iterator("train", batch_size=16, seed=5, **SINGLE), 6)
    again = _take(mix.iterator("train", batch_size=16, seed=5, **SINGLE), 6)
    other = _take(mix.iterator("train", batch_size=16, seed=6, **SINGLE), 6)
    _assert_equal_batches(first, again)
    assert not all(
        np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other, strict=True)
    )


def test_restart_at_step_n_continues_the_uninterrupted_stream(mix):
    full = _take(mix.iterator("train", batch_size=32, seed=7, **SINGLE), 26)
    # lowres (50 examples, ~8 per step) wraps its epoch every ~6 steps: restarts land
    # inside epochs and right at the start.
    for start in (1, 9, 20):
        resumed = _take(
            mix.iterator("train", batch_size=32, seed=7, start_step=start, **SINGLE), 26 - start
        )
        _assert_equal_batches(resumed, full[start:])


def test_processes_get_disjoint_shards_and_their_slice_of_the_global_batch(mix):
    steps = 20
    one = _concat(_take(mix.iterator("train", batch_size=32, seed=2, **SINGLE), steps))
    parts = [
        _take(mix.iterator("train", batch_size=32, seed=2, process_index=p, process_count=2), steps)
        for p in range(2)
    ]
    for p in range(2):
        assert parts[p][0]["inputs"].shape == (16, L, P)
    # Task choices hash the global slot: process 0 holds slots 0..15, process 1 16..31.
    global_ids = np.concatenate(
        [np.stack([b["task_id"] for b in parts[p]]) for p in range(2)], axis=1
    ).ravel()
    np.testing.assert_array_equal(global_ids, one["task_id"])
    # The two processes read disjoint halves of digits/class's train split (its first epoch).
    inputs, labels = _reference("digits/class", "train")
    seen = []
    for p in range(2):
        batch = _concat(parts[p])
        chosen = batch["task_id"] == 0
        seen.append(set(match_rows(batch["inputs"][chosen], inputs).tolist()))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # Default process arguments come from JAX (one process here).
    _assert_equal_batches(
        _take(mix.iterator("train", batch_size=8, seed=4), 2),
        _take(mix.iterator("train", batch_size=8, seed=4, **SINGLE), 2),
    )


@pytest.fixture(scope="module")
def global_mix(data_dir):  # noqa: F811
    return data.Mixture(
        TASKS, rate="explicit", image_size=8, patch_size=4, data_dir=data_dir, order="global"
    )


def test_global_order_gives_every_process_count_the_same_global_batches(global_mix, data_dir):  # noqa: F811
    steps = 14
    one = _take(global_mix.iterator("train", batch_size=24, seed=2, **SINGLE), steps)
    for count in (2, 3):
        parts = [
            global_mix.iterator(
                "train", batch_size=24, seed=2, process_index=p, process_count=count
            )
            for p in range(count)
        ]
        joined = [_concat([next(part) for part in parts]) for _ in range(steps)]
        _assert_equal_batches(joined, one)
    # The slots choose their tasks by the same hash as the process-sharded order.
    sharded = _take(
        data.Mixture(TASKS, image_size=8, patch_size=4, data_dir=data_dir)
        .iterator("train", batch_size=24, seed=2, **SINGLE),
        steps,
    )  # fmt: skip
    np.testing.assert_array_equal(_concat(one)["task_id"], _concat(sharded)["task_id"])
    # Resuming on 3 processes inside lowres's first epoch (step 5) and past it (step 11,
    # ~66 of its examples taken): process 1 gets its rows of the same batches.
    for start in (5, 11):
        resumed = global_mix.iterator(
            "train", batch_size=24, seed=2, start_step=start, process_index=1, process_count=3
        )
        _assert_equal_batches(
            _take(resumed, steps - start),
            [{k: v[8:16] for k, v in b.items()} for b in one[start:]],
        )
    # Two passes over one dataset, and two iterators of it at once, see the same batches.
    dataset = global_mix.dataset("train", batch_size=24, seed=2, **SINGLE)
    first, second = dataset.as_numpy_iterator(), dataset.as_numpy_iterator()
    _assert_equal_batches(_take(first, 3), one[:3])
    _assert_equal_batches(_take(second, 4), one[:4])
    _assert_equal_batches(_take(first, 3), one[3:6])


def test_global_order_epochs_are_shuffles_and_the_split_must_fit(global_mix, data_dir):  # noqa: F811
    batches = _concat(_take(global_mix.iterator("train", batch_size=32, seed=0, **SINGLE), 40))
    lowres = batches["inputs"][batches["task_id"] == 1][:150]  # 3 epochs of the 50 examples
    labels = batches["label"][batches["task_id"] == 1][:150]
    reference, reference_labels = _reference("digits/lowres", "train")
    epochs = [
        match_rows(
            _with_labels(lowres[i : i + 50], labels[i : i + 50]),
            _with_labels(reference, reference_labels),
        )
        for i in (0, 50, 100)
    ]
    for order in epochs:
        assert sorted(order) == list(range(50))  # each example once, with its label
    orders = {tuple(order.tolist()) for order in epochs}
    assert len(orders) == 3  # every epoch reshuffled
    with pytest.raises(ValueError, match="task 'wine' needs .* bytes > cache_bytes=1000"):
        data.Mixture({"wine": 1.0}, data_dir=data_dir, order="global", cache_bytes=1000)
    with pytest.raises(ValueError, match="order='shuffled' is not one of"):
        data.Mixture({"wine": 1.0}, data_dir=data_dir, order="shuffled")


@pytest.mark.parametrize("process_count, batch_size", [(1, 64), (3, 48)])
def test_eval_covers_every_example_exactly_once(mix, process_count, batch_size):
    local = batch_size // process_count
    for task_id, name in enumerate(NAMES):
        inputs, labels = _reference(name, "validation")
        num_batches = math.ceil(math.ceil(len(labels) / process_count) / local)
        found = []
        for p in range(process_count):
            batches = list(
                mix.eval_iterator(
                    task_id,
                    "validation",
                    batch_size=batch_size,
                    process_index=p,
                    process_count=process_count,
                )
            )
            assert len(batches) == num_batches  # the same count on every process
            batch = _concat(batches)
            assert batch["inputs"].shape == (num_batches * local, L, P)
            assert np.all(batch["task_id"] == task_id)
            padding = ~batch["valid"]
            assert not batch["inputs"][padding].any() and not batch["label"][padding].any()
            assert batch["mask"].any(axis=1).all()  # no all-masked row, padding included
            found.append(_with_labels(batch["inputs"][~padding], batch["label"][~padding]))
        matched = match_rows(np.concatenate(found), _with_labels(inputs, labels))
        assert sorted(matched) == list(range(len(labels))), name
        assert (
            mix.num_eval_batches(
                task_id, "validation", batch_size=batch_size, process_count=process_count
            )
            == num_batches
        )


def test_eval_batches_walk_all_tasks_in_order(mix):
    seen = [
        (t, int(b["valid"].sum())) for t, b in mix.eval_batches("test", batch_size=512, **SINGLE)
    ]
    assert seen == [(0, 359), (1, 359), (2, 36), (3, 30), (4, 512), (4, 488)]
    only = [t for t, _ in mix.eval_batches("test", batch_size=512, task_ids=[3, 1], **SINGLE)]
    assert only == [3, 1]


def test_rates_from_real_split_sizes(data_dir):  # noqa: F811
    sizes = [sources.TABULAR_SPLIT_SIZES[n]["train"] for n in ("wine", "iris")]  # 106, 90
    assert sizes == [106, 90]

    def rates(**kwargs):
        return data.Mixture(["wine", "iris"], data_dir=data_dir, **kwargs).rates

    np.testing.assert_allclose(rates(rate="proportional"), [106 / 196, 90 / 196])
    np.testing.assert_allclose(rates(rate="proportional", cap=95), [95 / 185, 90 / 185])
    root = np.sqrt([106, 90])
    np.testing.assert_allclose(rates(rate="temperature", temperature=2.0), root / root.sum())


@pytest.mark.parametrize(
    "tasks, kwargs, match",
    [
        ({"wine": -1.0}, {}, "Weight of task 'wine'"),
        ({"wine": 0.0, "iris": 0}, {}, "At least one task weight"),
        ({"wine": float("inf")}, {}, "finite"),
        ({"wine": 1.0}, {"rate": "uniform"}, "rate='uniform'"),
        ({"wine": 1.0}, {"cap": 10}, "takes no cap"),
        ({"wine": 1.0}, {"rate": "temperature"}, "temperature"),
        ({"wine": 1.0}, {"image_size": 10, "patch_size": 4}, "must divide"),
        ({"no_such_task_xyz": 1.0}, {}, "Unknown task 'no_such_task_xyz'"),
        ({}, {}, "at least one task"),
        ("wine", {}, "mapping"),
    ],
)
def test_bad_mixtures(data_dir, tasks, kwargs, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        data.Mixture(tasks, data_dir=data_dir, **kwargs)


def test_bad_iterator_arguments(mix):
    with pytest.raises(ValueError, match=r"no split 'dev'"):
        mix.iterator("dev", batch_size=8, **SINGLE)
    with pytest.raises(ValueError, match=r"no split 'training'"):
        list(mix.eval_batches("training", batch_size=8, **SINGLE))
    with pytest.raises(ValueError, match="batch_size=30 .* divisible by process_count=4"):
        mix.iterator("train", batch_size=30, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="batch_size=30 .* divisible by process_count=4"):
        mix.eval_batches("test", batch_size=30, process_index=1, process_count=4)
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        mix.iterator("train", batch_size=0, **SINGLE)
    with pytest.raises(ValueError, match="start_step=-1 must be an int >= 0"):
        mix.iterator("train", batch_size=8, start_step=-1, **SINGLE)
    with pytest.raises(ValueError, match="seed=-3 must be an int >= 0"):
        mix.iterator("train", batch_size=8, seed=-3, **SINGLE)
    with pytest.raises(ValueError, match=r"process_index must be an int in \[0, 2\)"):
        mix.iterator("train", batch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"task_id must be an int in \[0, 5\)"):
        mix.eval_iterator(5, "test", batch_size=8, **SINGLE)
