"""Every config loads, documents its command, and builds; the TPU config's shapes are checked
abstractly on a fake 256-device pod mesh (nothing is allocated, nothing compiled)."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType
from ml_collections import config_flags

from multitask_moe import parallel
from multitask_moe.core import build as build_lib
from multitask_moe.core.config_lib import parse_weights
from multitask_moe.core.step import TRAIN_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
ROUTINGS = ("tokens", "experts", "task", "task_tokens", "per_task")
# (classes, modality, tokens) of the embedded tasks the default config uses (from the data
# module's documented layout), so configs can be built without opening the datasets.
DEFAULT_TASKS = {
    "digits/class": 10,
    "digits/parity": 2,
    "digits/rotated": 10,
    "digits/lowres": 10,
    "wine": 3,
    "breast_cancer": 2,
    "iris": 3,
    "synthetic/a0": 4,
    "synthetic/a1": 4,
    "synthetic/a2": 4,
}
TABULAR = {"wine", "breast_cancer", "iris", "synthetic/a0", "synthetic/a1", "synthetic/a2"}
DEFAULT_TOKENS = (30, 4)  # breast_cancer's 30 features; 2x2 patches of 1 channel
TPU_TASKS = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10, "oxford_flowers102": 102}


def load(name, arg=None):
    path = os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else "")
    return config_flags.config_flags.ConfigFileFlagParser(name="config").parse(path)


def explicit_mesh(shape, names=("data", "expert")):
    return AbstractMesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))


def build(config, mesh, tasks, modalities, token_shape):
    return build_lib.build(config, mesh, list(tasks), list(tasks.values()), modalities, token_shape)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_docstring_starts_with_its_command(name):
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        source = f.read()
    first_line = source.split('"""')[1].splitlines()[0]
    command = "evolve" if name == "evolve" else "train"  # the evolution has its own command
    assert first_line.startswith(
        f"python -m multitask_moe.{command} --config=configs/{name}.py --workdir="
    ), first_line
    assert load(name).num_train_steps > 0


def test_default_config_is_the_8_device_cpu_mixture():
    config = load("default")
    assert (config.platform, config.num_cpu_devices) == ("cpu", 8)
    assert dict(config.mesh) == {"data": 2, "expert": 4}
    assert set(parse_weights(config.data.tasks, "tasks")) == set(DEFAULT_TASKS)
    assert config.model.moe.routing == "task_tokens"


def test_dense_config_is_the_default_with_moe_off_and_equal_active_mlp():
    default, dense = load("default"), load("dense")
    assert dense.model.moe_every == 0 and dense.model.moa_every == 0
    moe = default.model.moe
    assert (moe.d_hidden or default.model.mlp_dim // moe.top_k) * moe.top_k == dense.model.mlp_dim
    for key in ("data", "mesh", "optimizer", "batch_size", "num_train_steps"):
        assert default[key] == dense[key], key


@pytest.mark.parametrize("arg", [f"routing={r}" for r in ROUTINGS] + ["mod_squad", "dropless"])
def test_default_variants_build_on_the_default_mesh(arg):
    config = load("default", arg)
    modalities = ["tabular" if t in TABULAR else "image" for t in DEFAULT_TASKS]
    model = build(config, explicit_mesh((2, 4)), DEFAULT_TASKS, modalities, DEFAULT_TOKENS)
    expected = ["block1/moe", "block3/moe"]
    if arg == "mod_squad":
        expected = ["block0/moa", "block1/moe", "block2/moa", "block3/moe"]
    assert list(model.spec.sparse_layers) == expected
    # One routing group per device's share of the batch (64 / 8 = 8 examples of 30 tokens),
    # chosen for the model without writing it into the config.
    assert build_lib.routing_group_size(config, explicit_mesh((2, 4)), 30) == 8 * 30
    assert config.model.moe.group_size is None


def test_unknown_variant_arg_is_an_error():
    with pytest.raises(ValueError, match="unknown config arg 'routnig'"):
        load("default", "routnig=task").keys()


def per_device_bytes(abstract) -> int:
    """Bytes one device holds: each leaf divided by the shards its spec splits it into."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        spec, mesh = leaf.sharding.spec, leaf.sharding.mesh
        shards = 1
        for entry in spec:
            for axis in entry if isinstance(entry, tuple) else (entry,):
                shards *= mesh.shape[axis] if axis else 1
        total += leaf.size * leaf.dtype.itemsize // shards
    return total


def test_tpu_config_shapes_on_a_fake_pod_mesh():
    config = load("tpu_image_mixture")
    assert config.platform == "" and config.num_cpu_devices == 0
    assert set(parse_weights(config.data.tasks, "tasks")) == set(TPU_TASKS)
    mesh = explicit_mesh((32, 8))  # 256 chips: mesh.data=-1 takes 32 of them
    parallel.check_batch_divisible(config.batch_size, mesh)
    parallel.check_experts_divisible(config.model.moe.num_experts, mesh)
    parallel.check_experts_divisible(config.model.moa.num_experts, mesh)
    tokens = (config.data.image_size // config.data.patch_size) ** 2
    token_shape = (tokens, config.data.patch_size**2 * 3)
    assert token_shape == (196, 768)
    model = build(config, mesh, TPU_TASKS, ["image"] * 4, token_shape)
    spec = model.spec
    assert len(spec.sparse_layers) == 12  # MoA in the 6 even blocks, MoE in the 6 odd ones

    params = spec.abstract["params"]
    w_in = params["blocks"][1]["mlp"]["moe"]["experts"]["w_in"]
    assert w_in.shape == (16, 768, 768)  # E, D, mlp_dim / top_k
    assert w_in.sharding.spec[0] == "expert"
    w_query = params["blocks"][0]["attention"]["moa"]["w_query"]
    assert w_query.shape == (24, 768, 64) and w_query.sharding.spec[0] == "expert"
    assert params["head_kernel"].shape == (4, 768, 102)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert 150e6 < num_params < 250e6, num_params  # ViT-B active compute, 16-expert MLPs
    # Parameters + Adam moments per chip, well inside a v4/v5p chip's 32/95 GiB of HBM.
    assert per_device_bytes(spec.abstract) < 4 * 2**30

    # The whole train step traces on the pod mesh: shapes, shardings and the
    # expert-parallel all-to-alls are all resolved abstractly.
    batch = build_lib.abstract_batch(
        config.batch_size,
        token_shape,
        TRAIN_KEYS,
        jax.sharding.NamedSharding(mesh, parallel.batch_spec(mesh)),
    )
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(model.train_fn).trace(spec.abstract, batch)
    new_state, metrics = traced.out_info
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    assert metrics["block1/moe/expert_counts"].shape == (16,)
    assert jax.tree.structure(new_state) == jax.tree.structure(spec.abstract)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(spec.abstract), strict=True):
        assert new.shape == old.shape and new.dtype == old.dtype


def test_a_config_written_before_a_field_existed_reads_with_its_default(tmp_path):
    import json

    from multitask_moe.core import config_lib

    saved = config_lib.base_config().to_dict()
    del saved["profile_steps"], saved["model"]["moe"]["exchange"]
    saved["seed"] = 7
    saved["evolve"] = {"steps": 3}  # a section only some configs have stays
    (tmp_path / config_lib.CONFIG_FILE).write_text(json.dumps(saved))
    config = config_lib.read_config(str(tmp_path))
    assert (config.profile_steps, config.model.moe.exchange) == (0, "auto")
    assert (config.seed, config.evolve.steps) == (7, 3)


def test_evolve_config_variants_set_their_fields():
    assert load("evolve").evolve.free_expert_slots == 0  # whole blocks: muNet as published
    assert load("evolve", "expert_slots=4").evolve.free_expert_slots == 4
    assert load("evolve", "size_scale=0.5").evolve.size_scale == 0.5
