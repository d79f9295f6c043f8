"""Text classification from TFDS through the same registry, mixture and model: byte-level
tokens (no vocabulary), checked under tfds.testing.mock_data in its default form against
the raw strings, and a forward + gradient of a model with a text stem."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from multitask_moe import data
from multitask_moe.data import tasks as tasks_lib
from multitask_moe.models import MultitaskTransformer

SINGLE = {"process_index": 0, "process_count": 1}


@pytest.fixture
def mocked(tmp_path):
    """tfds.testing.mock_data for one test only: a module-wide mock would still be active
    in the training test below, which reads a real prepared dataset."""
    with tfds.testing.mock_data(num_examples=8):
        yield str(tmp_path / "nothing_prepared")


def _raw_texts(task) -> list[bytes]:
    import tensorflow_datasets as tfds

    dataset = task.builder().as_dataset(split=task.splits["train"])
    return [example[task.input_key] for example in tfds.as_numpy(dataset)]


def test_text_datasets_resolve_with_their_text_feature(mocked):
    for name, key, classes in (
        ("imdb_reviews", "text", 2),
        ("ag_news_subset", "description", 4),
        ("glue/sst2", "sentence", 2),  # no supervised keys: the first Text feature
    ):
        task = data.get_task(name, data_dir=mocked)
        assert (task.modality, task.input_key, task.num_classes) == ("text", key, classes)
        assert task.num_tokens(8, 2) == tasks_lib.TEXT_LENGTH and task.token_dim(8, 2) == 1


@pytest.mark.slow  # ~20 s of tf.data pipelines
def test_text_tokens_are_the_bytes_plus_one_and_the_mask_their_length(mocked):
    mix = data.Mixture({"imdb_reviews": 1.0, "iris": 1.0}, image_size=8, patch_size=2,
                       data_dir=mocked)  # fmt: skip
    assert mix.token_shape == (tasks_lib.TEXT_LENGTH, 1)
    raw = _raw_texts(mix.tasks[0])
    references = []
    for text in raw:
        ids = np.frombuffer(text, np.uint8)[: tasks_lib.TEXT_LENGTH].astype(np.float32) + 1
        references.append(ids)
    seen = 0
    for batch in itertools.islice(mix.iterator("train", batch_size=8, seed=0, **SINGLE), 4):
        for inputs, mask, task_id in zip(batch["inputs"], batch["mask"], batch["task_id"],
                                         strict=True):  # fmt: skip
            if task_id != 0:
                continue
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert not inputs[n:].any()
            matches = [r for r in references if len(r) == n and np.array_equal(r, inputs[:n, 0])]
            assert matches, "a text token row that is no example's bytes"
            seen += 1
    assert seen > 0


def test_a_model_with_text_image_and_tabular_tasks_runs_and_differentiates():
    model = MultitaskTransformer(
        task_num_classes=[2, 10, 3],
        task_modalities=["text", "image", "tabular"],
        token_shape=(16, 4),
        d_model=16, depth=1, num_heads=2, mlp_dim=16, rngs=nnx.Rngs(0),
    )  # fmt: skip
    assert set(model.stem.stems.keys()) == {"image", "tabular", "text"}
    rng = np.random.default_rng(0)
    inputs = np.zeros((3, 16, 4), np.float32)
    inputs[0, :5, 0] = [105, 106, 33, 1, 256]  # bytes 104, 105, 32, 0, 255
    inputs[1] = rng.normal(size=(16, 4))
    inputs[2, :4, 0] = rng.normal(size=4)
    mask = np.array([[True] * 5 + [False] * 11, [True] * 16, [True] * 4 + [False] * 12])
    task_ids = jnp.array([0, 1, 2])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Heads start at zero (every gradient below them would be 0): perturb every parameter.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)],
    )

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(inputs, mask, task_ids, deterministic=True)
        return jnp.sum(logits**2), logits

    grads, logits = jax.grad(loss, has_aux=True)(params)
    assert np.isfinite(np.asarray(logits)).all()
    table = grads["stem"]["stems"]["text"]["embedding"][...]  # [257, D]
    used = {105, 106, 33, 1, 256}
    touched = {int(i) for i in np.nonzero(np.abs(np.asarray(table)).sum(-1))[0]}
    assert touched == used  # exactly the embedded bytes get a gradient


def _reviews(n: int, seed: int):
    """Tiny reviews whose words decide the label (1 = positive)."""
    rng = np.random.default_rng(seed)
    words = {0: ["bad", "dull", "awful"], 1: ["good", "great", "fine"]}
    texts, labels = [], []
    for _ in range(n):
        labels.append(int(rng.integers(2)))
        texts.append("it was " + " ".join(rng.choice(words[labels[-1]], int(rng.integers(1, 6)))))
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices({"text": texts, "label": labels})


@pytest.mark.slow  # compiles the default model with a text stem on the (2, 4) mesh
def test_a_prepared_text_dataset_trains_in_the_default_run(tmp_path):
    import os

    from ml_collections import config_flags

    from multitask_moe.core import config_lib
    from multitask_moe.train import train

    data_dir = str(tmp_path / "tfds")
    # A prepared TFDS text dataset without supervised keys: the registry finds its Text
    # feature and "label".
    tfds.dataset_builders.store_as_tfds_dataset(
        name="mtm_test_reviews",
        version="1.0.0",
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}
        ),
        split_datasets={"train": _reviews(64, 0), "test": _reviews(16, 1)},
        data_dir=data_dir,
    )
    task = data.get_task("mtm_test_reviews", data_dir=data_dir)
    assert task.splits == {"train": "train[:58]", "validation": "train[58:]", "test": "test"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_flags.config_flags.ConfigFileFlagParser(name="config").parse(
        os.path.join(repo, "configs", "default.py")
    )
    config_lib.set_fields(config, {
        "data.tasks": "mtm_test_reviews=1, iris=1",
        "data.data_dir": data_dir,
        "num_train_steps": 30, "eval_every_steps": 0, "checkpoint_every_steps": 0,
        "log_every_steps": 10, "batch_size": 16, "eval_batch_size": 16,
        "optimizer.warmup_steps": 3, "optimizer.learning_rate": 3e-3,
        "progress_bar": False, "write_plots": False,
    })  # fmt: skip
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["test/mtm_test_reviews/num_examples"] == 16
    # The words decide the label; 30 steps on bytes already beat the majority class.
    assert results["test/mtm_test_reviews/accuracy"] >= 0.75
