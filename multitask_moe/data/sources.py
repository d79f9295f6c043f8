"""Raw examples of the embedded tasks, as numpy arrays (no TensorFlow here).

The embedded TFDS builders (`embedded.py`) write exactly what these functions return, so
the tests can check a built dataset against this module and this module against
scikit-learn's bundled data.

Shapes: N examples, F features, H = W = 8 digit pixels, C classes.

- `digits_splits()`: the 1,797 real 8x8 handwritten digits of scikit-learn, pixel values
  0..16 rescaled to uint8 0..255, split once and for all (stratified, fixed seed) into
  train / validation / test; every digit task uses the same split so that no image is a
  training image of one digit task and a test image of another.
- `tabular_splits(name)`: wine, breast_cancer and iris from scikit-learn, raw float32
  features, stratified 60/20/20 split.
- `synthetic_splits(name)`: tasks from teacher networks; tasks of one family share
  structure (weights correlated with `relatedness`), tasks of different families share
  none (independent draws).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

SPLITS = ("train", "validation", "test")
DIGITS_SPLIT_SEED = 0
DIGITS_FRACTIONS = {"validation": 0.1, "test": 0.2}
TABULAR_FRACTIONS = {"validation": 0.2, "test": 0.2}
LOWRES_PER_CLASS = 5  # digits/lowres: 5 training images per digit -> 50 in all

# Dataset sizes that the builders produce (checked by the tests against the split rule).
DIGITS_SPLIT_SIZES = {"train": 1259, "validation": 179, "test": 359}
LOWRES_SPLIT_SIZES = {"train": 50, "validation": 179, "test": 359}
TABULAR_SPLIT_SIZES = {
    "wine": {"train": 106, "validation": 36, "test": 36},
    "breast_cancer": {"train": 343, "validation": 113, "test": 113},
    "iris": {"train": 90, "validation": 30, "test": 30},
}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a task: `inputs` [N, ...] and int64 `labels` [N]."""

    inputs: np.ndarray
    labels: np.ndarray


def stratified_split(
    labels: np.ndarray, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Indices [N_split] of a fixed stratified split.

    For every class c with n_c examples, a seeded permutation of its examples gives
    round(fraction * n_c) examples to each split named in `fractions` (in order) and the
    rest to "train". Returned indices are sorted, so the split's order follows the source.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], **{name: [] for name in fractions}}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, fraction in fractions.items():
            take = int(round(fraction * len(members)))
            parts[name].append(members[start : start + take])
            start += take
        parts["train"].append(members[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def digits_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits: uint8 images [1797, 8, 8, 1] and labels [1797].

    scikit-learn stores pixels as 0..16; they become round(v * 255 / 16) so that TFDS
    Image features (uint8 0..255) hold them without loss of order or range.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def digits_splits(config: str) -> dict[str, Split]:
    """Splits of one digit task.

    config: "class" (digit 0-9), "parity" (0 even, 1 odd), "rotated" (digit 0-9 of the
    image rotated by 90 degrees counter-clockwise), "lowres" (digit 0-9 from only
    LOWRES_PER_CLASS training images per digit; same validation and test as "class").
    """
    images, digits = digits_images_and_labels()
    index = stratified_split(digits, DIGITS_FRACTIONS, DIGITS_SPLIT_SEED)
    if config == "lowres":
        train = index["train"]
        index["train"] = np.sort(
            np.concatenate([train[digits[train] == c][:LOWRES_PER_CLASS] for c in range(10)])
        )
    if config == "rotated":
        images = np.rot90(images, k=1, axes=(1, 2))
    if config == "parity":
        labels = digits % 2
    elif config in ("class", "rotated", "lowres"):
        labels = digits
    else:
        raise ValueError(
            f"Unknown digits config {config!r}; allowed: 'class', 'parity', 'rotated', 'lowres'."
        )
    return {name: Split(np.ascontiguousarray(images[i]), labels[i]) for name, i in index.items()}


TABULAR_LOADERS = {
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
    "iris": "load_iris",
}


def tabular_splits(name: str) -> dict[str, Split]:
    """Splits of a scikit-learn tabular task: float32 features [N, F], labels [N]."""
    if name not in TABULAR_LOADERS:
        raise ValueError(f"Unknown tabular dataset {name!r}; allowed: {sorted(TABULAR_LOADERS)}.")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, TABULAR_LOADERS[name])()
    features = bunch.data.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    index = stratified_split(labels, TABULAR_FRACTIONS, seed=0)
    return {split: Split(features[i], labels[i]) for split, i in index.items()}


def standardization(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean [F] and std [F] of the train split; a constant feature gets std 1."""
    mean = train_features.astype(np.float64).mean(axis=0)
    std = train_features.astype(np.float64).std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Synthetic task families.


@dataclasses.dataclass(frozen=True)
class SyntheticFamily:
    """A family of tasks whose teachers share weights to the degree `relatedness` (rho).

    Teacher k of the family: W_k = rho * W_f + sqrt(1 - rho^2) * U_k (same for V), with
    W_f shared by the family and U_k private, all standard normal; so corresponding weights
    of two tasks of one family correlate with rho^2 and those of two families with 0.
    """

    seed: int
    relatedness: float
    num_tasks: int = 3
    num_features: int = 16
    hidden: int = 32
    num_classes: int = 4
    sizes: tuple[int, int, int] = (2000, 500, 1000)  # train, validation, test


SYNTHETIC_FAMILIES = {
    "a": SyntheticFamily(seed=1001, relatedness=0.95),
    "b": SyntheticFamily(seed=2002, relatedness=0.95),
}


@dataclasses.dataclass(frozen=True)
class Teacher:
    """labels = argmax(tanh(x W / sqrt(F)) V / sqrt(H) + bias); W [F, H], V [H, C], bias [C]."""

    w: np.ndarray
    v: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x [N, F] -> logits [N, C]."""
        hidden = np.tanh(x @ self.w / np.sqrt(self.w.shape[0]))  # [N, H]
        return hidden @ self.v / np.sqrt(self.v.shape[0]) + self.bias

    def labels(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=-1).astype(np.int64)


def synthetic_teacher(family: SyntheticFamily, index: int) -> Teacher:
    """Teacher `index` of `family`, with a bias that balances its classes.

    The bias is fitted on a fixed calibration sample (multiplicative updates of the class
    frequencies towards 1/C), so every class has roughly the same share of examples.
    """
    if not 0 <= index < family.num_tasks:
        raise ValueError(f"Task index {index} out of range [0, {family.num_tasks}).")
    f, h, c, rho = family.num_features, family.hidden, family.num_classes, family.relatedness
    shared = np.random.default_rng([family.seed, 0])
    w_shared, v_shared = shared.standard_normal((f, h)), shared.standard_normal((h, c))
    private = np.random.default_rng([family.seed, 1 + index])
    mix = np.sqrt(1.0 - rho**2)
    w = rho * w_shared + mix * private.standard_normal((f, h))
    v = rho * v_shared + mix * private.standard_normal((h, c))
    calibration = np.random.default_rng([family.seed, 10_000]).standard_normal((8192, f))
    logits = Teacher(w, v, np.zeros(c)).logits(calibration)  # [8192, C] before the bias
    bias = np.zeros(c)
    for _ in range(100):
        counts = np.bincount(np.argmax(logits + bias, axis=-1), minlength=c)
        bias -= 0.5 * np.log(np.maximum(counts, 1) / len(calibration) * c)
    return Teacher(w, v, bias)


def parse_synthetic_name(name: str) -> tuple[SyntheticFamily, int]:
    """ "a1" -> (family a, task index 1)."""
    family_name, index = name[:1], name[1:]
    if family_name not in SYNTHETIC_FAMILIES or not index.isdigit():
        raise ValueError(
            f"Unknown synthetic task {name!r}; allowed: "
            f"{[f + str(i) for f in SYNTHETIC_FAMILIES for i in range(3)]}."
        )
    family = SYNTHETIC_FAMILIES[family_name]
    if int(index) >= family.num_tasks:
        raise ValueError(
            f"Synthetic family {family_name!r} has {family.num_tasks} tasks: {name!r}."
        )
    return family, int(index)


def synthetic_splits(name: str) -> dict[str, Split]:
    """Splits of synthetic task `name` ("a0"): x ~ N(0, I) float32 [N, F], teacher labels."""
    family, index = parse_synthetic_name(name)
    teacher = synthetic_teacher(family, index)
    rng = np.random.default_rng([family.seed, 100 + index])
    out = {}
    for split, size in zip(SPLITS, family.sizes, strict=True):
        x = rng.standard_normal((size, family.num_features)).astype(np.float32)
        out[split] = Split(x, teacher.labels(x.astype(np.float64)))
    return out


SYNTHETIC_NAMES = tuple(
    f"{family}{i}" for family, spec in SYNTHETIC_FAMILIES.items() for i in range(spec.num_tasks)
)
