"""Test session set-up: a simulated 8-device CPU platform, fixed before JAX initializes.

Everything sharded is tested on this platform against the unsharded result.
"""

import os

# Must run before jax creates its backends; conftest is imported before any test module.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
