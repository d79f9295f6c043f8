"""Two real JAX processes: a simultaneous embedded build, and each process's batch slice.

Slow (two fresh interpreters import TensorFlow and JAX), so excluded from `make test`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_data_support import data_dir  # noqa: F401

from multitask_moe import data

TASKS = {"digits/class": 1.0, "wine": 1.0, "synthetic/b1": 0.5}

_WORKER = """
import json, sys
import numpy as np
import jax

jax.config.update("jax_platforms", "cpu")
address, process_id, data_dir, fresh_dir, out = sys.argv[1:6]
jax.distributed.initialize(address, num_processes=2, process_id=int(process_id))
from multitask_moe import data
from multitask_moe.data import embedded

# Both processes leave initialize() together and race to build the same dataset.
built = embedded.prepare("mtm_tabular", "breast_cancer", fresh_dir)
mix = data.Mixture(json.loads(sys.argv[6]), image_size=8, patch_size=4, data_dir=data_dir)
batch = next(mix.iterator("train", batch_size=8, seed=11))  # process args from JAX
valid = np.concatenate([b["valid"] for _, b in mix.eval_batches("test", batch_size=64)])
np.savez(out, built=built, inputs=batch["inputs"], task_id=batch["task_id"], valid=valid)
jax.distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_jax_processes(data_dir, tmp_path):  # noqa: F811
    mix = data.Mixture(TASKS, image_size=8, patch_size=4, data_dir=data_dir)  # builds first
    fresh = tmp_path / "fresh"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                f"127.0.0.1:{port}",
                str(p),
                data_dir,
                str(fresh),
                str(tmp_path / f"{p}.npz"),
                json.dumps(TASKS),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for p in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=500)
        assert proc.returncode == 0, err[-3000:]
    results = [np.load(tmp_path / f"{p}.npz") for p in range(2)]
    # Exactly one process built; the other waited for it and reused the complete dataset.
    assert sorted(bool(r["built"]) for r in results) == [False, True]
    task = data.get_task("breast_cancer", data_dir=str(fresh))
    assert task.builder().info.splits["train"].num_examples == 343
    for p, got in enumerate(results):
        want = next(mix.iterator("train", batch_size=8, seed=11, process_index=p, process_count=2))
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["task_id"], want["task_id"])
        # Test splits: digits 359 -> 180 + 179, wine 36 -> 18 + 18, synthetic 1000 -> 500 each;
        # every process yields the same number of (padded) batches.
        assert got["valid"].sum() == [180 + 18 + 500, 179 + 18 + 500][p]
        assert len(got["valid"]) == (6 + 1 + 16) * 32  # ceil(180 / 32), ceil(18 / 32), ...
