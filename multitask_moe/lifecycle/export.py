"""An extracted model's forward as a `jax.export` artifact that needs only jax and numpy.

    O/export/forward.jax     serialized jax.export.Exported (symbolic batch size "b")
    O/export/params.npz      its parameters, leaf_0000 ... in the order it takes them
    O/export/signature.json  input shapes and dtypes, the task, its classes

Loading (a fresh process; nothing from this project is imported):

    exported = jax.export.deserialize(open("O/export/forward.jax", "rb").read())
    leaves = [params[f"leaf_{i:04d}"] for i in range(len(params.files))]
    logits = exported.call(leaves, inputs, mask)   # inputs [b, L, P] f32, mask [b, L] bool

The function is exported for one device with no mesh (a served per-task model needs
none); its non-parameter state (e.g. usage statistics) is baked in as constants.
Shape legend: b batch (symbolic), L tokens, P features per token, C the task's classes.
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from flax import nnx

from multitask_moe.core.workdir import Restored

EXPORT_FILES = ("forward.jax", "params.npz", "signature.json")


def export_forward(restored: Restored, directory: str) -> jax.export.Exported:
    """Writes the forward of a one-task model (logits of its own classes) to `directory`."""
    experiment = restored.experiment
    if len(experiment.task_names) != 1:
        raise ValueError(f"export takes a one-task model, got {len(experiment.task_names)} tasks")
    spec = experiment.model.spec
    num_classes = experiment.task_num_classes[0]
    params, model_state = jax.device_get((restored.state["params"], restored.state["model_state"]))
    leaves, treedef = jax.tree.flatten(params)

    def forward(leaves, inputs, mask):
        model = nnx.merge(spec.graphdef, jax.tree.unflatten(treedef, leaves), model_state)
        task_ids = jnp.zeros(inputs.shape[:1], jnp.int32)
        logits, _ = model(inputs, mask, task_ids, deterministic=True)
        return logits[:, :num_classes]  # [b, C]

    length, width = experiment.token_shape
    (batch,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(forward), platforms=("cpu",))(
        [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves],
        jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    )
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(os.path.join(directory, "forward.jax"), "wb") as f:
        f.write(exported.serialize())
    buffer = io.BytesIO()  # np.savez seeks back, which a gfile (e.g. gs://) cannot
    np.savez(buffer, **{f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    with tf.io.gfile.GFile(os.path.join(directory, "params.npz"), "wb") as f:
        f.write(buffer.getvalue())
    signature = {
        "task": experiment.task_names[0],
        "num_classes": num_classes,
        "inputs": {"shape": ["b", length, width], "dtype": "float32"},
        "mask": {"shape": ["b", length], "dtype": "bool"},
        "logits": {"shape": ["b", num_classes], "dtype": "float32"},
        "num_param_leaves": len(leaves),
    }
    with tf.io.gfile.GFile(os.path.join(directory, "signature.json"), "w") as f:
        json.dump(signature, f, indent=2)
    return exported
