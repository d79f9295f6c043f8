"""One process of the multi-host test (tests/test_multihost.py), also its reference.

As a script (started by tests/multihost.py with MTM_* and XLA_FLAGS in the environment):
    python tests/multihost_worker.py OUT_DIR
joins the other processes through multitask_moe.parallel.initialize(), builds the global
batch from this process's rows only (jax.make_array_from_process_local_data), runs the
expert-parallel MoE forward and backward, and process 0 writes the gathered results to
OUT_DIR/result.npz. Imported, `compute` runs the same thing in one process as reference.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import multitask_moe as mtm
from multitask_moe import parallel

# Data axis 1, expert axis 8: the all-to-all, the aux psum and the gradient all-reduce
# all cross the process boundary.
MESH_AXES = {"data": 1, "expert": 8}
BATCH, LENGTH, D_MODEL, D_HIDDEN, NUM_EXPERTS, NUM_TASKS = 8, 4, 16, 32, 8, 3


def global_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The global batch every process agrees on: x [B, L, D] float32, task ids [B]."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, LENGTH, D_MODEL)).astype(np.float32)
    task_ids = (np.arange(BATCH) % NUM_TASKS).astype(np.int32)
    return x, task_ids


def _loss(layer, x, task_ids):
    y, aux = layer(x, task_ids)
    loss = jnp.sum(y * jnp.cos(y)) + aux["load_balance_loss"] + aux["mutual_info_loss"]
    return loss, (y, aux)


@nnx.jit
def _forward_backward(layer, x, task_ids):
    (_, (y, aux)), grads = nnx.value_and_grad(_loss, has_aux=True)(layer, x, task_ids)
    return y, aux, nnx.to_pure_dict(grads)


def compute(mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Forward + backward of the expert-parallel MoE on `mesh`, inputs built per process.

    Returns flat {name: global array}: y, aux/<key>, grad/<param path>.
    """
    x, task_ids = global_inputs()
    sharding = parallel.batch_sharding(mesh)
    # The batch rows this process's devices hold, in order; only those leave the host.
    rows = sorted(
        {
            row
            for index in sharding.addressable_devices_indices_map(x.shape).values()
            for row in range(*index[0].indices(BATCH))
        }
    )
    global_x = jax.make_array_from_process_local_data(sharding, x[rows], x.shape)
    global_tasks = jax.make_array_from_process_local_data(sharding, task_ids[rows], task_ids.shape)
    with jax.set_mesh(mesh):
        layer = mtm.MoE(
            D_MODEL,
            D_HIDDEN,
            NUM_EXPERTS,
            top_k=2,
            routing="task_tokens",
            capacity_factor=1.0,
            num_tasks=NUM_TASKS,
            group_size=LENGTH,
            num_shared_experts=1,
            rngs=nnx.Rngs(0),
        )
        local_experts = {
            shard.data.shape[0] for shard in layer.experts.w_in[...].addressable_shards
        }
        assert local_experts == {NUM_EXPERTS // 8}, local_experts  # sharded from creation
        y, aux, grads = _forward_backward(layer, global_x, global_tasks)
    out = {"y": y}
    out.update({f"aux/{key}": value for key, value in aux.items()})
    flat_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
    out.update(
        {
            "grad/" + "/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in flat_grads
        }
    )
    return out


def main(out_dir: str) -> None:
    start = time.monotonic()
    log = lambda what: print(f"[{time.monotonic() - start:6.1f}s] {what}", flush=True)
    # gloo is jax's default CPU collective; named here because the test depends on it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    info = parallel.initialize()  # "auto": explicit, from the MTM_* variables
    assert info.mode == "explicit" and info.num_processes == 2, info
    assert len(jax.local_devices()) == 4 and len(jax.devices()) == 8, jax.devices()
    log(f"process {info.process_id} joined: {jax.devices()}")
    result = compute(parallel.make_mesh(MESH_AXES))
    log("forward + backward done")
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(result, tiled=True)
    if info.process_id == 0:
        np.savez(f"{out_dir}/result.npz", **{k: np.asarray(v) for k, v in gathered.items()})
    # No process may exit while another still needs it for a collective.
    multihost_utils.sync_global_devices("multihost_worker done")
    log("done")


if __name__ == "__main__":
    main(sys.argv[1])
