"""A sweep of bad inputs through the library: each raises ConfigError (or ValueError)
with one line naming the value and what is allowed, and writes nothing into the workdir.

The command line maps the same errors to `error: ...` and exit status 2; test_train.py
runs a table of them as processes (BAD_CONFIGS).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import tiny_config

from multitask_moe import models, parallel
from multitask_moe.core.evaluate import global_batch
from multitask_moe.core.step import TRAIN_KEYS
from multitask_moe.moe import MoESettings
from multitask_moe.train import ConfigError, train_and_evaluate

DROPLESS = {"model.moe.capacity_factor": None, "model.moe.eval_capacity_factor": None}

# name -> (overrides of the tiny training config, a fragment of the one-line message)
BAD_CONFIGS = {
    "task weight not a number": ({"data.tasks": "wine=abc"}, "weight 'abc' of 'wine' is not a"),
    "no tasks": ({"data.tasks": ""}, "data.tasks is empty"),
    "unknown task": ({"data.tasks": "iris=1, nope=1"}, "Unknown task 'nope'"),
    "negative task weight": ({"data.tasks": "iris=-1"}, "weight of 'iris' is -1.0; must be >= 0"),
    "all weights zero": ({"data.tasks": "iris=0"}, "at least one weight must be > 0"),
    "example limit not an int": ({"data.tasks": "iris=1@x"}, "the example limit 'x' after @"),
    "mixing rate": ({"data.rate": "bogus"}, "rate='bogus' is not one of"),
    "example order": ({"data.order": "shuffled"}, "order='shuffled' is not one of"),
    "patch vs image size": ({"data.patch_size": 3}, "patch_size=3 must divide image_size=8"),
    "dataset not prepared in data_dir": (
        {"data.data_dir": "/nonexistent/dir", "data.tasks": "mnist=1"},
        "is not prepared in data_dir='/nonexistent/dir'",
    ),
    "mesh vs devices": ({"mesh.data": 3}, "use 12 devices but 8 are available"),
    "mesh axis size 0": ({"mesh.expert": 0}, "mesh axis 'expert' size must be >= 1 or -1"),
    "batch vs batch shards": ({"batch_size": 36}, "batch size 36 is not divisible by the 8"),
    "eval batch 0": ({"eval_batch_size": 0}, "eval_batch_size=0 must be an int >= 1"),
    "negative steps": ({"num_train_steps": -5}, "num_train_steps=-5 must be an int >= 0"),
    "learning rate": ({"optimizer.learning_rate": -1.0}, "learning_rate=-1.0 must be > 0"),
    "warmup": ({"optimizer.warmup_steps": -1}, "optimizer.warmup_steps=-1 must be an int >= 0"),
    "aux weight": ({"aux_loss.load_balance": -1.0}, "aux_loss.load_balance=-1.0 must be >= 0"),
    "experts vs expert axis": ({"model.moe.num_experts": 6}, "num_experts=6 is not divisible"),
    "routing": ({"model.moe.routing": "sideways"}, "routing='sideways' is not a routing kind"),
    "top_k": ({"model.moe.top_k": 9}, "top_k=9 must be an int in [1, num_experts=8]"),
    "capacity factor": ({"model.moe.capacity_factor": -1.0}, "capacity_factor=-1.0 must be > 0"),
    "exchange": ({"model.moe.exchange": "mesh"}, "exchange='mesh' is not allowed; allowed:"),
    "ragged exchange on cpu": (
        {**DROPLESS, "model.moe.exchange": "ragged"},
        "exchange='ragged' needs a GPU or TPU backend",
    ),
    "d_model": ({"model.d_model": 0}, "model.d_model=0 must be an int >= 1"),
    "depth": ({"model.depth": 0}, "model.depth=0 must be an int >= 1"),
    "heads vs width": ({"model.num_heads": 3}, "num_heads=3 must divide d_model=32"),
    "dtype": ({"model.dtype": "float8"}, "dtype='float8' is not supported"),
    "moe placement": ({"model.moe_every": -1}, "a placement period must be >= 0"),
    "task weighting": ({"task_weighting": "bogus"}, "task_weighting='bogus' is not allowed"),
    "task loss weights": ({"task_weights": "iris=-1"}, "weights must be >= 0"),
    "freeze": ({"freeze": "bogus"}, "freeze='bogus' is not allowed; allowed:"),
    "init_from missing": ({"init_from": "/nonexistent/run"}, "has no config.json"),
    "new_task_init alone": ({"new_task_init": "nearest"}, "needs init_from"),
    "checkpoints kept": ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be an int >= 1"),
    "log interval": ({"log_every_steps": -1}, "log_every_steps=-1 must be an int >= 1"),
    "seed": ({"seed": -1}, "seed=-1 must be an int >= 0"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_raises_one_line_and_writes_nothing(name, tmp_path):
    overrides, fragment = BAD_CONFIGS[name]
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as caught:
        train_and_evaluate(tiny_config(**overrides), str(workdir))
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    assert not workdir.exists()


def test_task_ids_out_of_range_reaching_the_model():
    model = models.MultitaskTransformer(
        task_num_classes=[3, 4],
        task_modalities=["tabular", "tabular"],
        token_shape=(4, 2),
        d_model=8,
        depth=2,
        num_heads=2,
        mlp_dim=8,
        moe=MoESettings(num_experts=4, top_k=1, d_hidden=8, routing="task"),
        moe_every=2,
        rngs=nnx.Rngs(0),
    )
    inputs, mask = jnp.ones((2, 4, 2)), jnp.ones((2, 4), bool)
    with pytest.raises(ValueError, match=r"task_ids contain \[5\]; allowed: 0 <= task_id < "):
        model(inputs, mask, jnp.array([0, 5]), deterministic=True)


def test_nan_in_the_inputs_of_a_batch():
    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    batch = {
        "inputs": np.zeros((8, 4, 2), np.float32),
        "mask": np.ones((8, 4), bool),
        "label": np.zeros(8, np.int32),
        "task_id": np.arange(8, dtype=np.int32) % 3,
    }
    batch["inputs"][5, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[5\] \(task ids \[2\]\)"):
        global_batch(batch, TRAIN_KEYS, parallel.batch_sharding(mesh))
