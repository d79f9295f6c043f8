"""Embedded TFDS builders: real datasets that build offline from data bundled with the code.

Builders (TFDS names; one config per task):
  mtm_digits/{class,parity,rotated,lowres}    8x8 grayscale digits (scikit-learn)
  mtm_tabular/{wine,breast_cancer,iris}       real tabular data (scikit-learn)
  mtm_synthetic/{a0,a1,a2,b0,b1,b2}           teacher-generated tabular families
Examples: digits {"image": uint8 [8, 8, 1], "label"}; tabular and synthetic
{"features": float32 [F], "label"}, with the train split's per-feature mean and std in
`info.metadata` ("feature_mean", "feature_std").

`prepare(builder_cls, config, data_dir)` builds a dataset once. TFDS writes into a
temporary directory and renames it into place, so a dataset directory is either complete
or absent; on local disks a file lock makes a second process wait for the first build
instead of racing it, and on any file system a builder that lost the rename race accepts
the winner's complete dataset.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import io
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from multitask_moe.data import sources

_VERSION = tfds.core.Version("1.0.0")
_NOTES = {"1.0.0": "First release."}
_HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html"


class _TaskConfig(tfds.core.BuilderConfig):
    """One task: its label count and, for tabular data, its feature count."""

    def __init__(self, *, num_classes: int, num_features: int = 0, **kwargs):
        super().__init__(version=_VERSION, release_notes=_NOTES, **kwargs)
        self.num_classes = num_classes
        self.num_features = num_features


class MtmDigits(tfds.core.GeneratorBasedBuilder):
    """Digit tasks on the 1,797 real 8x8 handwritten digits of scikit-learn."""

    VERSION = _VERSION
    RELEASE_NOTES = _NOTES
    BUILDER_CONFIGS = [
        _TaskConfig(name="class", num_classes=10, description="Digit 0-9."),
        _TaskConfig(name="parity", num_classes=2, description="0 even digit, 1 odd digit."),
        _TaskConfig(name="rotated", num_classes=10, description="Digit of the image rotated 90°."),
        _TaskConfig(name="lowres", num_classes=10, description="Digit from 50 training images."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        splits = sources.digits_splits(self.builder_config.name)
        return {name: self._generate_examples(split) for name, split in splits.items()}

    def _generate_examples(self, split: sources.Split):
        for i, (image, label) in enumerate(zip(split.inputs, split.labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


class _FeatureBuilder(tfds.core.GeneratorBasedBuilder):
    """Tabular examples {"features": [F], "label"} plus train-split standardization."""

    @abc.abstractmethod
    def _splits(self) -> dict[str, sources.Split]:
        """The task's splits as numpy arrays."""

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "features": tfds.features.Tensor(
                        shape=(config.num_features,), dtype=np.float32
                    ),
                    "label": tfds.features.ClassLabel(num_classes=config.num_classes),
                }
            ),
            supervised_keys=("features", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        splits = self._splits()
        mean, std = sources.standardization(splits["train"].inputs)
        self.info.metadata["feature_mean"] = mean.tolist()
        self.info.metadata["feature_std"] = std.tolist()
        return {name: self._generate_examples(split) for name, split in splits.items()}

    def standardization(self) -> tuple[list[float], list[float]]:
        """(mean, std) per feature of the train split: the stored metadata, or computed
        again from the source when the info has none (tfds.testing.mock_data builds the
        info from code, without what the build stored)."""
        if "feature_mean" in self.info.metadata:
            return self.info.metadata["feature_mean"], self.info.metadata["feature_std"]
        mean, std = sources.standardization(self._splits()["train"].inputs)
        return mean.tolist(), std.tolist()

    def _generate_examples(self, split: sources.Split):
        for i, (features, label) in enumerate(zip(split.inputs, split.labels, strict=True)):
            yield i, {"features": features, "label": int(label)}


class MtmTabular(_FeatureBuilder):
    """Real tabular tasks bundled with scikit-learn."""

    VERSION = _VERSION
    RELEASE_NOTES = _NOTES
    BUILDER_CONFIGS = [
        _TaskConfig(name="wine", num_classes=3, num_features=13, description="Wine cultivar."),
        _TaskConfig(
            name="breast_cancer", num_classes=2, num_features=30, description="Malignant/benign."
        ),
        _TaskConfig(name="iris", num_classes=3, num_features=4, description="Iris species."),
    ]

    def _splits(self) -> dict[str, sources.Split]:
        return sources.tabular_splits(self.builder_config.name)


class MtmSynthetic(_FeatureBuilder):
    """Synthetic task families with controlled relatedness (see sources.SyntheticFamily)."""

    VERSION = _VERSION
    RELEASE_NOTES = _NOTES
    BUILDER_CONFIGS = [
        _TaskConfig(
            name=name,
            num_classes=sources.parse_synthetic_name(name)[0].num_classes,
            num_features=sources.parse_synthetic_name(name)[0].num_features,
            description=f"Task {name[1:]} of synthetic family {name[0]!r}.",
        )
        for name in sources.SYNTHETIC_NAMES
    ]

    def _splits(self) -> dict[str, sources.Split]:
        return sources.synthetic_splits(self.builder_config.name)


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "mtm_digits": MtmDigits,
    "mtm_tabular": MtmTabular,
    "mtm_synthetic": MtmSynthetic,
}


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str) -> Iterator[None]:
    """An exclusive lock per builder under a local data_dir; nothing for remote ones."""
    if "://" in data_dir:  # gs:// etc.: no flock; the atomic rename below still holds
        yield
        return
    lock_dir = os.path.join(data_dir, ".mtm_locks")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, f"{name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(builder_name: str, config: str, data_dir: str) -> bool:
    """Build `builder_name/config` into data_dir unless it is there; True if it built now.

    Never downloads anything (there is nothing to download) and never touches GCS. A
    build prints one line.
    """
    start = time.perf_counter()
    with _quiet_tfds():
        built = _prepare(builder_name, config, data_dir)
    if built:
        print(
            f"Built the embedded dataset {builder_name}/{config} in "
            f"{time.perf_counter() - start:.1f} s (from installed packages; nothing "
            f"downloaded) into {data_dir}",
            flush=True,
        )
    return built


def _prepare(builder_name: str, config: str, data_dir: str) -> bool:
    builder_cls = BUILDERS[builder_name]
    if builder_cls(config=config, data_dir=data_dir).is_prepared():
        return False
    with _build_lock(data_dir, builder_name):
        builder = builder_cls(config=config, data_dir=data_dir)  # re-read: maybe built now
        if builder.is_prepared():
            return False
        download_config = tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
        try:
            builder.download_and_prepare(download_config=download_config)
        except Exception:
            # Another process (without a shared lock, e.g. on a remote file system) renamed
            # its complete copy into place first, so our rename failed: use theirs. Any
            # other failure leaves the dataset unprepared and is raised.
            if not builder_cls(config=config, data_dir=data_dir).is_prepared():
                raise
            return False
    return True


class _DropUnbuiltFolderWarnings(logging.Filter):
    """TFDS warns that the folder it is about to build has no dataset_info.json yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Building prints one line (prepare's), not TFDS's: its banner says "Downloading and
    preparing dataset" although nothing is downloaded, and its progress bars, one per
    split and shuffle, fill the console for a build of a few seconds."""
    from tensorflow_datasets.core.utils import tqdm_utils

    bars = tqdm_utils._active
    tqdm_utils.display_progress_bar(False)
    absl_logger = logging.getLogger("absl")
    quiet = _DropUnbuiltFolderWarnings()
    absl_logger.addFilter(quiet)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.removeFilter(quiet)
        tqdm_utils.display_progress_bar(bars)
