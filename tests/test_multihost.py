"""Multi-host: 2 processes x 4 CPU devices, joined by jax.distributed with gloo, give the
same expert-parallel MoE forward and backward as 1 process with 8 devices."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from multihost import run_processes
from multihost_worker import MESH_AXES, compute

from multitask_moe import parallel

WORKER = Path(__file__).with_name("multihost_worker.py")


@pytest.mark.slow  # two fresh interpreters
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_processes_match_one_process(tmp_path):
    run_processes(
        WORKER,
        [str(tmp_path)],
        log_dir=tmp_path / "logs",
        num_processes=2,
        devices_per_process=4,
        timeout_s=240,
    )
    result = dict(np.load(tmp_path / "result.npz"))

    reference = jax.device_get(compute(parallel.make_mesh(MESH_AXES)))
    assert sorted(result) == sorted(reference)
    assert any(name.startswith("grad/experts/w_in") for name in result)
    for name, expected in reference.items():
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)
