"""Meshes from configs, batch shardings, and multi-host start-up arguments."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from multitask_moe import parallel
from multitask_moe.parallel import distributed


@pytest.mark.parametrize(
    "axes, names, shape",
    [
        ({"data": -1, "expert": 4}, ("data", "expert"), (2, 4)),
        ({"expert": 2, "data": -1}, ("data", "expert"), (4, 2)),  # canonical order
        ({"data": 2, "fsdp": 2, "expert": 2}, ("data", "fsdp", "expert"), (2, 2, 2)),
        ({"data": 1, "expert": -1, "model": 2}, ("data", "expert", "model"), (1, 4, 2)),
        ({"data": 8}, ("data",), (8,)),
    ],
)
def test_make_mesh_resolves_sizes_in_canonical_order(axes, names, shape):
    mesh = parallel.make_mesh(axes)
    assert mesh.axis_names == names
    assert tuple(mesh.shape[name] for name in names) == shape
    assert mesh.devices.size == 8 and len(set(mesh.devices.flat)) == 8


def test_make_mesh_on_given_devices():
    mesh = parallel.make_mesh({"data": -1, "expert": 2}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "expert": 2}
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"dat": 2, "expert": 4}, r"unknown mesh axis name\(s\) \['dat'\].*allowed"),
        ({"tensor": -1}, r"unknown mesh axis name\(s\) \['tensor'\]"),
        ({"data": -1, "expert": -1}, r"at most one mesh axis may have size -1"),
        ({"data": -1, "expert": 3}, r"8 devices is not divisible by 3"),
        ({"data": 2, "expert": 2}, r"use 4 devices but 8 are available"),
        ({"data": 0, "expert": 8}, r"'data' size must be >= 1 or -1"),
        ({"data": 2.0, "expert": 4}, r"'data' size must be an int"),
        ({}, r"non-empty mapping"),
    ],
)
def test_make_mesh_rejects_bad_axes(axes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(axes)


def test_batch_is_split_over_data_and_expert_axes_not_model():
    mesh = parallel.make_mesh({"data": 2, "expert": 2, "model": 2})
    assert parallel.batch_axes(mesh) == ("data", "expert")
    assert parallel.num_batch_shards(mesh) == 4
    sharding = parallel.batch_sharding(mesh)
    assert sharding.spec == PartitionSpec(("data", "expert"))
    x = jax.device_put(np.arange(8 * 3.0).reshape(8, 3), sharding)
    # Every batch shard holds distinct rows; the two 'model' replicas hold the same ones.
    rows = {tuple(np.asarray(shard.data)[:, 0]) for shard in x.addressable_shards}
    assert len(rows) == 4 and sorted(r for rs in rows for r in rs) == list(range(0, 24, 3))


def test_check_batch_divisible_names_the_shards():
    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    assert parallel.check_batch_divisible(16, mesh) == 2
    with pytest.raises(
        ValueError,
        match=r"batch size 12 is not divisible by the 8 batch "
        r"shards data\(2\) x expert\(4\)",
    ):
        parallel.check_batch_divisible(12, mesh)


def test_check_experts_divisible():
    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    assert parallel.check_experts_divisible(8, mesh) == 2
    assert parallel.expert_axis_size(None) == 1
    assert parallel.expert_axis_size(parallel.make_mesh({"data": 8})) == 1
    with pytest.raises(
        ValueError,
        match=r"num_experts=6 is not divisible by the 'expert' "
        r"mesh axis size 4",
    ):
        parallel.check_experts_divisible(6, mesh)


# --- multi-host start-up (the joining itself is exercised by tests/test_multihost.py) ---


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        *distributed._SLURM_VARS,
        distributed._OPEN_MPI_VAR,
        distributed.ENV_COORDINATOR_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        distributed.ENV_LOCAL_DEVICE_IDS,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_default_does_nothing(clean_env):
    assert distributed.detect_cluster() is None
    info = parallel.initialize()
    assert info == parallel.DistributedInfo("none", 0, 1)
    assert parallel.initialize("none").mode == "none"
    assert not jax.distributed.is_initialized()


def test_cluster_detection_from_launcher_variables(clean_env):
    for name in distributed._SLURM_VARS:
        clean_env.setenv(name, "0")
    assert distributed.detect_cluster() == "slurm"
    for name in distributed._SLURM_VARS:
        clean_env.delenv(name)
    clean_env.setenv(distributed._OPEN_MPI_VAR, "123.0;tcp://10.0.0.1:4000")
    assert distributed.detect_cluster() == "ompi"


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({"mode": "pod"}, {}, r"mode must be one of .*'explicit'.*got 'pod'"),
        (
            {"mode": "explicit"},
            {},
            r"needs coordinator_address \(or \$MTM_COORDINATOR_ADDRESS\), num_processes",
        ),
        (
            {"mode": "explicit", "coordinator_address": "10.0.0.1:1234", "num_processes": 2},
            {},
            r"needs process_id \(or \$MTM_PROCESS_ID\)",
        ),
        (
            {"mode": "explicit"},
            {"MTM_COORDINATOR_ADDRESS": "h:1", "MTM_NUM_PROCESSES": "two", "MTM_PROCESS_ID": "0"},
            r"num_processes from \$MTM_NUM_PROC",
        ),
        (
            {
                "mode": "explicit",
                "coordinator_address": "nohost",
                "num_processes": 2,
                "process_id": 0,
            },
            {},
            r"coordinator_address must be 'host:port'",
        ),
        (
            {"mode": "explicit", "coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
            {},
            r"process_id must be an int in \[0, 2\), got 2",
        ),
        ({"mode": "slurm"}, {}, r"mode='slurm' but this is not a SLURM task: missing"),
        ({"mode": "tpu"}, {}, r"mode='tpu' but this is not a Cloud TPU VM"),
        ({"mode": "tpu", "num_processes": 2}, {}, r"pass coordinator_address etc. only"),
        ({}, {"MTM_PROCESS_ID": "0"}, r"needs coordinator_address"),  # auto -> explicit
    ],
)
def test_initialize_rejects_bad_arguments(clean_env, kwargs, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        parallel.initialize(**kwargs)
    assert not jax.distributed.is_initialized()
