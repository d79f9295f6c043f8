"""Test session set-up: a simulated 8-device CPU platform, fixed before JAX initializes.

Everything sharded is tested on this platform against the unsharded result.
"""

import os
import shutil
import tempfile

# Must run before jax creates its backends; conftest is imported before any test module.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session and every process it starts (CLI runs,
# multi-process workers, notebook kernels inherit the environment): many tests build the
# same tiny models, and a program compiled once is loaded after that instead of compiled.
# A fresh directory per session unless one is given, so each run starts cold as CI does.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtm-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)


def pytest_collection_modifyitems(config, items):
    on_cpu = jax.default_backend() == "cpu"
    for item in items:  # an experiment run is slow too: `-m "not slow"` leaves it out
        if item.get_closest_marker("experiment"):
            item.add_marker("slow")
        if on_cpu and item.get_closest_marker("accelerator"):
            item.add_marker(
                pytest.mark.skip(
                    reason="needs a GPU or TPU: run with JAX_PLATFORMS=cuda (or tpu) "
                    "-m accelerator on a machine that has one"
                )
            )


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
