"""Numpy-level data checks (no TensorFlow): splits, synthetic families, rates, task choices."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

from multitask_moe.data import rates, sources


def _keys(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
    return collections.Counter(
        (image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
    )


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digit_splits_partition_the_real_digits(digits):
    splits = sources.digits_splits("class")
    assert {k: len(v.labels) for k, v in splits.items()} == sources.DIGITS_SPLIT_SIZES
    assert sum(sources.DIGITS_SPLIT_SIZES.values()) == 1797
    expected = _keys(np.round(digits.images * 255 / 16).astype(np.uint8)[..., None], digits.target)
    found = sum((_keys(s.inputs, s.labels) for s in splits.values()), collections.Counter())
    assert found == expected  # every image exactly once across the three splits
    for name, fraction in sources.DIGITS_FRACTIONS.items():  # stratified
        per_class = np.bincount(splits[name].labels, minlength=10)
        assert np.all(np.abs(per_class - fraction * np.bincount(digits.target)) <= 0.5)
    assert splits["train"].inputs.shape[1:] == (8, 8, 1)
    assert splits["train"].inputs.dtype == np.uint8


def test_related_digit_tasks_share_the_split():
    base = sources.digits_splits("class")
    parity = sources.digits_splits("parity")
    rotated = sources.digits_splits("rotated")
    lowres = sources.digits_splits("lowres")
    for split in sources.SPLITS:
        np.testing.assert_array_equal(parity[split].inputs, base[split].inputs)
        np.testing.assert_array_equal(parity[split].labels, base[split].labels % 2)
        np.testing.assert_array_equal(rotated[split].labels, base[split].labels)
        for image, rotated_image in zip(base[split].inputs, rotated[split].inputs, strict=True):
            # 90° counter-clockwise: the top row becomes the left column, read bottom-up.
            np.testing.assert_array_equal(rotated_image[::-1, 0, 0], image[0, :, 0])
    assert len(lowres["train"].labels) == 50 <= 50
    assert np.all(np.bincount(lowres["train"].labels) == sources.LOWRES_PER_CLASS)
    assert _keys(lowres["train"].inputs, lowres["train"].labels) <= _keys(
        base["train"].inputs, base["train"].labels
    )
    for split in ("validation", "test"):
        np.testing.assert_array_equal(lowres[split].inputs, base[split].inputs)
    assert {k: len(v.labels) for k, v in lowres.items()} == sources.LOWRES_SPLIT_SIZES


@pytest.mark.parametrize(
    "name, loader, num_classes",
    [("wine", load_wine, 3), ("breast_cancer", load_breast_cancer, 2), ("iris", load_iris, 3)],
)
def test_tabular_splits_are_the_real_rows(name, loader, num_classes):
    bunch = loader()
    splits = sources.tabular_splits(name)
    assert {k: len(v.labels) for k, v in splits.items()} == sources.TABULAR_SPLIT_SIZES[name]
    expected = _keys(bunch.data.astype(np.float32), bunch.target)
    found = sum((_keys(s.inputs, s.labels) for s in splits.values()), collections.Counter())
    assert found == expected
    assert set(np.unique(splits["train"].labels)) == set(range(num_classes))


def test_standardization_matches_hand_computation():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], np.float32)
    mean, std = sources.standardization(x)
    np.testing.assert_allclose(mean, [3.0, 5.0])
    np.testing.assert_allclose(std, [np.sqrt(8 / 3), 1.0])  # constant feature -> std 1


def test_synthetic_tasks_are_deterministic_and_balanced():
    first, second = sources.synthetic_splits("a1"), sources.synthetic_splits("a1")
    for split in sources.SPLITS:
        np.testing.assert_array_equal(first[split].inputs, second[split].inputs)
        np.testing.assert_array_equal(first[split].labels, second[split].labels)
    family = sources.SYNTHETIC_FAMILIES["a"]
    assert [len(first[s].labels) for s in sources.SPLITS] == list(family.sizes)
    shares = np.bincount(first["train"].labels, minlength=4) / family.sizes[0]
    assert np.all(np.abs(shares - 0.25) < 0.05), shares
    assert not np.array_equal(first["train"].inputs, sources.synthetic_splits("a2")["train"].inputs)


def test_synthetic_relatedness_within_and_across_families():
    names = sources.SYNTHETIC_NAMES
    teachers = {n: sources.synthetic_teacher(*sources.parse_synthetic_name(n)) for n in names}
    x = np.random.default_rng(123).standard_normal((20_000, 16))
    labels = {n: t.labels(x) for n, t in teachers.items()}
    rho = sources.SYNTHETIC_FAMILIES["a"].relatedness
    within, across = [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            agreement = np.mean(labels[a] == labels[b])
            correlation = np.corrcoef(teachers[a].w.ravel(), teachers[b].w.ravel())[0, 1]
            if a[0] == b[0]:
                within.append(agreement)
                assert abs(correlation - rho**2) < 0.1  # 0.9025 in expectation
            else:
                across.append(agreement)
                assert abs(correlation) < 0.15  # independent draws
    assert len(within) == 6 and len(across) == 9
    # Same family: the teachers mostly agree; different families: near chance (1/4), with
    # the spread of 9 random pairs.
    assert min(within) > 0.55 > 0.42 > max(across)
    assert abs(np.mean(across) - 0.25) < 0.06


def test_bad_source_names():
    with pytest.raises(ValueError, match="'c0'"):
        sources.synthetic_splits("c0")
    with pytest.raises(ValueError, match="'a7'"):
        sources.synthetic_splits("a7")
    with pytest.raises(ValueError, match="'mirror'"):
        sources.digits_splits("mirror")


# ------------------------------------------------------------------------------ rates


def test_explicit_rates():
    np.testing.assert_allclose(rates.mixing_rates([1.0, 0.5, 0.0, 2.5]), [0.25, 0.125, 0, 0.625])


def test_proportional_rates_with_cap_by_hand():
    # n = 1000, 100, 10 with cap 300: 300, 100, 10 -> / 410.
    got = rates.mixing_rates([1, 1, 1], "proportional", num_examples=[1000, 100, 10], cap=300)
    np.testing.assert_allclose(got, [300 / 410, 100 / 410, 10 / 410])
    # Weights scale the counts before the cap (seqio's scale): 2 * 100 = 200.
    got = rates.mixing_rates([1, 2, 0], "proportional", num_examples=[1000, 100, 10], cap=300)
    np.testing.assert_allclose(got, [300 / 500, 200 / 500, 0])


def test_temperature_rates_by_hand():
    # T = 2: sqrt(1000) = 31.6228, sqrt(100) = 10, sqrt(10) = 3.16228; sum 44.7851.
    got = rates.mixing_rates([1, 1, 1], "temperature", num_examples=[1000, 100, 10], temperature=2)
    np.testing.assert_allclose(got, [0.706101, 0.223289, 0.070610], atol=1e-6)
    # cap 100 then T = 2: 10, 10, 3.16228 -> sum 23.16228.
    got = rates.mixing_rates(
        [1, 1, 1], "temperature", num_examples=[1000, 100, 10], temperature=2, cap=100
    )
    np.testing.assert_allclose(got, [0.431736, 0.431736, 0.136527], atol=1e-6)
    # T = 1 is proportional; large T tends to uniform.
    np.testing.assert_allclose(
        rates.mixing_rates([1, 1], "temperature", num_examples=[30, 10], temperature=1),
        [0.75, 0.25],
    )
    uniform = rates.mixing_rates([1, 1], "temperature", num_examples=[30, 10], temperature=1e6)
    np.testing.assert_allclose(uniform, [0.5, 0.5], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": [1, -1]}, "finite and >= 0"),
        ({"weights": [0, 0]}, "At least one weight"),
        ({"weights": [1, float("nan")]}, "finite"),
        ({"weights": [1], "rate": "softmax"}, "softmax"),
        ({"weights": [1], "cap": 5}, "takes no cap"),
        ({"weights": [1], "rate": "temperature", "num_examples": [5]}, "temperature"),
        ({"weights": [1], "rate": "temperature", "num_examples": [5], "temperature": 0}, "> 0"),
        ({"weights": [1], "rate": "proportional", "num_examples": [5], "cap": -1}, "cap"),
        ({"weights": [1, 1], "rate": "proportional", "num_examples": [5]}, "num_examples"),
        ({"weights": [1], "rate": "proportional", "num_examples": [5], "temperature": 2}, "needs"),
    ],
)
def test_bad_rates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rates.mixing_rates(**kwargs)


# ------------------------------------------------------------------------------ choices


def test_splitmix64_known_values():
    # Reference outputs of splitmix64 seeded with 0 (Vigna's generator): state advances by
    # the golden gamma, so the n-th output is the finalizer of n * gamma.
    gamma = 0x9E3779B97F4A7C15
    got = rates.splitmix64(np.array([0, gamma, (2 * gamma) % 2**64], np.uint64))
    assert [int(v) for v in got] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_task_choices_match_rates_statistically():
    r = np.array([0.5, 0.0, 0.3, 0.2])
    choices = rates.TaskChoices(r, rates.stream_key(0, "train"), global_batch_size=64)
    tasks = choices.tasks(np.arange(2000), np.arange(64))  # [2000, 64]
    n = tasks.size
    freq = np.bincount(tasks.ravel(), minlength=4) / n
    sigma = np.sqrt(r * (1 - r) / n)
    assert np.all(np.abs(freq - r) <= 5 * sigma + 1e-12), (freq, r)
    assert freq[1] == 0  # a weight-0 task is never chosen


def test_counts_before_equals_a_plain_loop():
    choices = rates.TaskChoices([0.2, 0.3, 0.5], key=7, global_batch_size=8)
    slots = np.arange(4, 8)  # process 1 of 2
    expected = np.zeros(3, np.int64)
    for step in range(137):
        for task in choices.tasks(np.array([step]), slots)[0]:
            expected[task] += 1
    np.testing.assert_array_equal(choices.counts_before(137, slots, chunk=64), expected)
    np.testing.assert_array_equal(choices.counts_before(0, slots), [0, 0, 0])


def test_choices_depend_on_seed_and_step_not_on_process_split():
    a = rates.TaskChoices([0.5, 0.5], rates.stream_key(0, "train"), 8)
    b = rates.TaskChoices([0.5, 0.5], rates.stream_key(1, "train"), 8)
    steps = np.arange(50)
    assert not np.array_equal(a.tasks(steps, np.arange(8)), b.tasks(steps, np.arange(8)))
    halves = np.concatenate([a.tasks(steps, np.arange(4)), a.tasks(steps, np.arange(4, 8))], 1)
    np.testing.assert_array_equal(halves, a.tasks(steps, np.arange(8)))


def test_rounding_never_selects_a_trailing_zero_rate_task():
    r = np.array([1 / 3, 1 / 3, 1 / 3, 0.0])
    choices = rates.TaskChoices(r, key=3, global_batch_size=1)
    assert choices.tasks(np.arange(100_000), np.arange(1)).max() <= 2
