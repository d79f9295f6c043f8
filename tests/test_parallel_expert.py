"""Expert parallelism on the simulated 8-device CPU mesh, checked against the plain layer.

Dropless token choice crosses devices through the exchange the layer resolves: "auto" is
the ring on CPU (test_moe_matches_unsharded), the C = S all-to-all and the ragged
all-to-all are chosen explicitly below; the ragged one runs here with the collective
replaced by its all-gather emulation (XLA has no CPU ragged all-to-all) and is lowered for
TPU and GPU with jax.export.

The reference is the same layer (same parameters) run without a mesh; the sharded run
is that layer's state under jax.set_mesh, where MoE/MoA go expert-parallel. Compiled
functions are shared: one reference per layer config, one sharded program per (config,
mesh). Shapes are tiny (B=8, L=4, D=16, H=32, E=8, K=2): 2 CPU cores run the suite.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import multitask_moe as mtm
from multitask_moe import parallel
from multitask_moe.parallel import exchange as exchange_lib
from multitask_moe.parallel import hlo

ROUTINGS = ("tokens", "experts", "task", "task_tokens", "per_task")
TOKEN_CHOICE = ("tokens", "task", "task_tokens", "per_task")  # dropless: ring or ragged
MESH_SHAPES = ((1, 8), (2, 4), (4, 2), (8, 1))  # (data, expert)
BATCH, LENGTH, D_MODEL, D_HIDDEN, NUM_EXPERTS, TOP_K, NUM_TASKS = 8, 4, 16, 32, 8, 2, 3
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _mesh(shape):
    return parallel.make_mesh({"data": shape[0], "expert": shape[1]})


def _inputs():
    x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D_MODEL), jnp.float32)
    task_ids = jnp.arange(BATCH, dtype=jnp.int32) % NUM_TASKS
    # The padding mask (MoA, masked MoE): example 1 has two padding tokens, example 6 only padding.
    mask = jnp.ones((BATCH, LENGTH), bool).at[1, 2:].set(False).at[6].set(False)
    return x, task_ids, mask


def _moe(routing="tokens", capacity_factor=1.0, group_size=LENGTH, **options):
    # group_size=LENGTH: one routing group per sequence, so groups stay on one device.
    return mtm.MoE(
        D_MODEL,
        D_HIDDEN,
        NUM_EXPERTS,
        TOP_K,
        routing=routing,
        capacity_factor=capacity_factor,
        num_tasks=NUM_TASKS,
        group_size=group_size,
        rngs=nnx.Rngs(0),
        **options,
    )


def _moa(routing="task_tokens"):
    return mtm.MoA(
        D_MODEL,
        NUM_EXPERTS,
        TOP_K,
        head_dim=8,
        routing=routing,
        num_tasks=NUM_TASKS,
        causal=True,
        rngs=nnx.Rngs(0),
    )


def _loss(layer, x, task_ids=None, mask=None):
    y, aux = layer(x, task_ids, mask=mask)
    # Every aux loss is in the objective, so gradients through their psum are checked too.
    loss = (
        jnp.sum(y * jnp.cos(y))
        + aux["load_balance_loss"]
        + aux["router_z_loss"]
        + aux["mutual_info_loss"]
    )
    return loss, (y, aux)


# LLVM optimization level 0: these tiny programs compile about a third faster, and the
# reference and the sharded run share the setting, so the comparison is like for like.
@functools.partial(
    jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0}
)
def _forward_backward(graphdef, state, *inputs):
    (_, (y, aux)), grads = nnx.value_and_grad(_loss, has_aux=True)(
        nnx.merge(graphdef, state), *inputs
    )
    return {"y": y, "aux": aux, "grads": nnx.to_pure_dict(grads)}


def _run(layer, inputs, mesh_shape=None):
    graphdef, state = nnx.split(layer)
    if not mesh_shape:
        return _forward_backward(graphdef, state, *inputs)
    mesh = _mesh(mesh_shape)
    # As in training: the batch arrives split over the batch axes (ids and mask too).
    inputs = jax.device_put(inputs, parallel.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        return _forward_backward(graphdef, state, *inputs)


@functools.cache
def _moe_case(routing, capacity_factor):
    """(layer, unsharded results) for one routing config, computed once per session."""
    layer = _moe(routing, capacity_factor)
    inputs = _inputs()[:2]
    return layer, inputs, jax.device_get(_run(layer, inputs))


def _assert_same(sharded, reference):
    flat = jax.tree_util.tree_flatten_with_path(reference)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(sharded)[0])
    assert len(got) == len(flat)
    for path, expected in flat:
        np.testing.assert_allclose(
            np.asarray(got[path]), expected, **TOLERANCE, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=lambda s: f"data{s[0]}xexpert{s[1]}")
@pytest.mark.parametrize("capacity_factor", (1.0, None), ids=("capacity", "dropless"))
@pytest.mark.parametrize("routing", ROUTINGS)
def test_moe_matches_unsharded(routing, capacity_factor, mesh_shape):
    layer, inputs, reference = _moe_case(routing, capacity_factor)
    if capacity_factor is not None and routing != "experts":
        # C = 1 slot per expert per 4-token group: capacity really drops assignments.
        assert reference["aux"]["dropped_fraction"] > 0
    else:
        assert routing == "experts" or reference["aux"]["dropped_fraction"] == 0
    sharded = _run(layer, inputs, mesh_shape)
    _assert_same(sharded, reference)
    assert sharded["y"].sharding.spec == PartitionSpec(("data", "expert"), None, None)
    if mesh_shape[1] > 1:  # gradients stay with their experts
        assert sharded["grads"]["experts"]["w_in"].sharding.spec[0] == "expert"


@pytest.mark.parametrize("mesh_shape", ((2, 4), (1, 8)), ids=("data2xexpert4", "data1xexpert8"))
def test_moa_matches_unsharded(mesh_shape):
    layer, inputs = _moa(), _inputs()
    _assert_same(_run(layer, inputs, mesh_shape), jax.device_get(_run(layer, inputs)))


@pytest.mark.parametrize(
    "options",
    [
        # Training noise on the router (drawn globally, as on one device), shared experts.
        {"router_noise": 0.5, "num_shared_experts": 1},
        # One-hot dispatch, batch priority, renormalized gates, eval-time capacity.
        {
            "dispatch": "einsum",
            "batch_priority": True,
            "renormalize_gates": True,
            "eval_capacity_factor": 2.0,
            "deterministic": True,
        },
    ],
    ids=("noise-shared", "einsum-bpr-eval"),
)
def test_moe_options_match_unsharded(options):
    layer, inputs = _moe("task_tokens", 1.0, **options), _inputs()[:2]
    _assert_same(_run(layer, inputs, (2, 4)), jax.device_get(_run(layer, inputs)))


@pytest.mark.parametrize(
    "options, with_mask",
    [
        ({"renormalize_gates": True}, True),  # rerouted: task ids and padding gathered
        ({"router_noise": 0.5}, False),  # noise is per token: the choices are gathered
    ],
    ids=("rerouted-mask-renormalized", "noise-gathers-choices"),
)
def test_ring_matches_unsharded(options, with_mask):
    layer = _moe("task_tokens", None, exchange="ring", **options)
    inputs = _inputs() if with_mask else _inputs()[:2]
    _assert_same(_run(layer, inputs, (2, 4)), jax.device_get(_run(layer, inputs)))


def test_built_under_mesh_is_sharded_from_creation_with_the_same_values():
    plain_moe, plain_moa = _moe(num_shared_experts=1), _moa()
    with jax.set_mesh(_mesh((2, 4))):
        moe, moa = _moe(num_shared_experts=1), _moa()
    for param in (moe.experts.w_in, moe.experts.w_out, moa.w_query, moa.w_out):
        assert param[...].sharding.spec == PartitionSpec("expert", None, None)
        assert {s.data.shape[0] for s in param[...].addressable_shards} == {2}  # 8 / 4
        assert param.get_metadata()["out_sharding"] == PartitionSpec("expert", None, None)
    # Replicated: the router, the shared experts (every token uses them), MoA's keys/values.
    for param in (moe.router.kernel, moe.shared_experts.w_in, moa.w_kv):
        assert param[...].sharding.is_fully_replicated
    for built, plain in ((moe, plain_moe), (moa, plain_moa)):
        _assert_same(nnx.to_pure_dict(nnx.state(built)), nnx.to_pure_dict(nnx.state(plain)))


def test_expert_weights_are_drawn_sharded_not_copied():
    calls = []

    def recording_init(key, shape, dtype, out_sharding=None):
        calls.append(out_sharding)
        return jnp.zeros(shape, dtype, out_sharding=out_sharding)

    with jax.set_mesh(_mesh((2, 4))):
        parallel.sharding.expert_param(recording_init, jax.random.key(0), (8, 2, 3), jnp.float32)
    parallel.sharding.expert_param(recording_init, jax.random.key(0), (8, 2, 3), jnp.float32)
    assert calls == [PartitionSpec("expert", None, None), None]


def _forward_hlo(layer, inputs, mesh_shape=None, mask=None):
    graphdef, state = nnx.split(layer)
    forward = jax.jit(lambda state, inputs, mask: nnx.merge(graphdef, state)(*inputs, mask=mask))
    with jax.set_mesh(_mesh(mesh_shape)) if mesh_shape else contextlib.nullcontext():
        return forward.lower(state, inputs, mask).compile().as_text()


def test_moe_forward_hlo_has_two_all_to_alls_of_minimum_size():
    text = _forward_hlo(_moe("tokens", 1.0), _inputs()[:1], (2, 4))
    counts = hlo.collective_counts(text)
    assert counts["all-to-all"] == 2, hlo.collective_lines(text, "all-to-all")
    assert counts["all-gather"] == 0, hlo.collective_lines(text, "all-gather")
    # Each device sends its G * E * C slot rows: tokens * K * cf * D in total, each way.
    moved = sum(hlo.collective_bytes(text, "all-to-all")) * 8
    assert moved == 2 * BATCH * LENGTH * TOP_K * 1.0 * D_MODEL * 4
    # Only the summed router statistics are all-reduced (no expert weights move).
    assert counts["all-reduce"] == 1 and counts["reduce-scatter"] == 0


def test_dropless_all_to_all_hlo_moves_the_static_bound():
    text = _forward_hlo(_moe("tokens", None, exchange="all_to_all"), _inputs()[:1], (2, 4))
    assert hlo.collective_counts(text)["all-to-all"] == 2
    # C = S slots per expert per group: E / K times the rows a ragged exchange would send.
    moved = sum(hlo.collective_bytes(text, "all-to-all")) * 8
    assert moved == 2 * BATCH * LENGTH * NUM_EXPERTS * D_MODEL * 4


@pytest.mark.parametrize(
    "routing, with_mask, per_example, per_token",
    [
        ("tokens", False, 0, 0),  # the tokens alone
        ("task_tokens", False, 4, 0),  # one int32 task id per example
        ("tokens", True, 0, 1),  # the padding mask, one bool per token
    ],
    ids=("tokens", "task-ids", "mask"),
)
def test_ring_hlo_gathers_the_tokens_not_their_choices(routing, with_mask, per_example, per_token):
    x, task_ids, mask = _inputs()
    text = _forward_hlo(
        _moe(routing, None, exchange="ring"),
        (x, task_ids if routing != "tokens" else None),
        (2, 4),
        mask=mask if with_mask else None,
    )
    counts = hlo.collective_counts(text)
    assert counts["all-to-all"] == 0, hlo.collective_lines(text, "all-to-all")
    assert counts["reduce-scatter"] == 1
    tokens_here, examples_here, group = BATCH * LENGTH // 8, BATCH // 8, 4  # per device
    # Every device routes the gathered tokens itself: no expert ids or gates on the links.
    gathered = group * (tokens_here * (D_MODEL * 4 + per_token) + examples_here * per_example)
    assert sum(hlo.collective_bytes(text, "all-gather")) == gathered
    assert hlo.collective_bytes(text, "reduce-scatter") == [tokens_here * D_MODEL * 4]


def test_ring_with_router_noise_gathers_the_choices():
    layer = _moe("tokens", None, exchange="ring", router_noise=1.0)
    text = _forward_hlo(layer, _inputs()[:1], (2, 4))  # the layer trains: noise is drawn
    tokens_here, group = BATCH * LENGTH // 8, 4
    per_token = D_MODEL * 4 + 2 * TOP_K * 4  # a float32 row, K int32 experts, K gates
    assert sum(hlo.collective_bytes(text, "all-gather")) == group * tokens_here * per_token


@pytest.fixture
def emulated_ragged(monkeypatch):
    """The ragged exchange on CPU, its collective replaced by the all-gather emulation;
    yields the list of traced calls (the ragged path really ran)."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        return exchange_lib.emulated_ragged_all_to_all(*args, **kwargs)

    monkeypatch.setattr(exchange_lib, "ragged_all_to_all", recording)
    return calls


@pytest.mark.parametrize(
    "routing, mesh_shape",
    [("tokens", (2, 4)), ("task", (4, 2))]
    + [
        pytest.param(routing, shape, marks=pytest.mark.slow)
        for routing, shape in [("task_tokens", (2, 4)), ("per_task", (2, 4)), ("tokens", (1, 8))]
    ]
    + [pytest.param("task", (2, 4), marks=pytest.mark.slow)],
    ids=lambda v: f"data{v[0]}xexpert{v[1]}" if isinstance(v, tuple) else v,
)
def test_ragged_exchange_matches_unsharded(routing, mesh_shape, emulated_ragged):
    _, inputs, reference = _moe_case(routing, None)
    sharded = _run(_moe(routing, None, exchange="ragged"), inputs, mesh_shape)
    _assert_same(sharded, reference)
    assert len(emulated_ragged) == 2  # out and back (the backward is their transpose)


@pytest.mark.accelerator
@pytest.mark.parametrize("routing", ["tokens", "task"])
def test_ragged_exchange_runs_for_real_against_unsharded(routing):
    """XLA's own ragged all-to-all (no emulation) on every device of the GPU or TPU
    backend, the experts split over them, against the unsharded layer on one device;
    matmuls at full float32 precision on both sides (no TF32), so the test tolerance
    holds."""
    devices = jax.device_count()
    if NUM_EXPERTS % devices or BATCH % devices:
        pytest.skip(f"{devices} devices do not divide {NUM_EXPERTS} experts and {BATCH} rows")
    with jax.default_matmul_precision("highest"):
        inputs = _inputs()[:2]  # not _moe_case's cached reference: this precision
        reference = jax.device_get(_run(_moe(routing, None), inputs))
        sharded = _run(_moe(routing, None, exchange="ragged"), inputs, (1, devices))
    _assert_same(sharded, reference)


@pytest.mark.parametrize("platform", ("tpu", "cuda"))
def test_ragged_exchange_lowers_for_tpu_and_gpu(platform):
    layer = _moe("tokens", None, exchange="ragged")
    graphdef, state = nnx.split(layer)
    mesh = _mesh((2, 4))
    x = jax.ShapeDtypeStruct(
        (BATCH, LENGTH, D_MODEL), jnp.float32, sharding=parallel.batch_sharding(mesh)
    )

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * y) + aux["load_balance_loss"]

    programs = {}
    with jax.set_mesh(mesh):
        for name, fn in (("forward", loss), ("backward", jax.grad(loss))):
            exported = jax.export.export(
                jax.jit(fn),
                platforms=(platform,),
                # XLA's ragged all-to-all has no serialization guarantee yet; only lowering
                # is checked here, nothing is stored.
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
            )(state, x)
            programs[name] = exported.mlir_module()
    assert programs["forward"].count("custom_call @ragged_all_to_all") == 2
    assert programs["backward"].count("custom_call @ragged_all_to_all") >= 3
    for text in programs.values():  # no slots of C = S rows (the transpose swaps sizes)
        swaps = [line for line in text.splitlines() if '"stablehlo.all_to_all"' in line]
        assert all("xf32>" not in line for line in swaps), swaps


def test_exchange_resolution_and_bad_settings():
    resolve = exchange_lib.resolve
    assert resolve("auto", dropless_token_choice=True, backend="cpu") == "ring"
    assert resolve("auto", dropless_token_choice=True, backend="gpu") == "ragged"
    assert resolve("auto", dropless_token_choice=True, backend="tpu") == "ragged"
    assert resolve("ring", dropless_token_choice=False, backend="tpu") == "all_to_all"
    assert resolve("all_to_all", dropless_token_choice=True, backend="cpu") == "all_to_all"
    with pytest.raises(ValueError, match=r"exchange='mesh' is not allowed; allowed: \("):
        _moe("tokens", None, exchange="mesh")
    with pytest.raises(ValueError, match=r"exchange='ring' carries dropless token choice"):
        _moe("tokens", 1.0, exchange="ring")
    with pytest.raises(ValueError, match=r"exchange='ragged' carries dropless token choice"):
        _moe("experts", None, exchange="ragged")
    _moe("tokens", 1.0, eval_capacity_factor=None, exchange="ring")  # dropless at eval


def test_moa_hlo_has_four_all_to_alls_and_no_all_gather():
    x, task_ids, mask = _inputs()
    counts = hlo.collective_counts(_forward_hlo(_moa(), (x, task_ids), (2, 4), mask=mask))
    assert counts["all-to-all"] == 4 and counts["all-gather"] == 0


@pytest.mark.parametrize(
    "mesh_axes", ({"data": 8, "expert": 1}, {"data": 8}), ids=("expert-axis-1", "no-expert-axis")
)
def test_no_all_to_all_without_expert_sharding(mesh_axes):
    layer, inputs = _moe("tokens", 1.0), _inputs()[:1]
    mesh = parallel.make_mesh(mesh_axes)
    graphdef, state = nnx.split(layer)
    forward = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
    with jax.set_mesh(mesh):
        compiled = forward.lower(state, *inputs).compile()
        y, _ = compiled(state, *inputs)
    counts = hlo.collective_counts(compiled.as_text())
    # Only the aux statistics are summed over the 8 batch shards.
    assert counts["all-to-all"] == 0 and counts["all-gather"] == 0
    assert counts["all-reduce"] == 1
    np.testing.assert_allclose(y, _moe_case("tokens", 1.0)[2]["y"], **TOLERANCE)


def test_no_collectives_without_a_mesh():
    text = _forward_hlo(_moe("tokens", 1.0), _inputs()[:1])
    assert set(hlo.collective_counts(text).values()) == {0}


def test_bad_layouts_raise_clear_errors():
    x, task_ids, _ = _inputs()
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh):
        with pytest.raises(
            ValueError,
            match=r"num_experts=6 is not divisible by the "
            r"'expert' mesh axis size 4",
        ):
            mtm.MoE(D_MODEL, D_HIDDEN, 6, TOP_K, rngs=nnx.Rngs(0))
    built_outside = mtm.MoE(D_MODEL, D_HIDDEN, 6, TOP_K, rngs=nnx.Rngs(0))
    layer = _moe("tokens", 1.0)
    straddling = _moe("tokens", 1.0, group_size=2 * LENGTH)
    one_group = mtm.MoE(D_MODEL, D_HIDDEN, NUM_EXPERTS, TOP_K, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"num_experts=6 is not divisible"):
            built_outside(x)
        with pytest.raises(
            ValueError,
            match=r"batch size 4 is not divisible by the 8 "
            r"batch shards data\(2\) x expert\(4\)",
        ):
            layer(x[:4])
        with pytest.raises(
            ValueError,
            match=r"group_size=8 does not divide the 4 tokens "
            r"per device",
        ):
            straddling(x)
        one_group(x)  # the default group, one sequence, never straddles devices
        with pytest.raises(ValueError, match=r"task_ids contain \[7\]"):
            _moe("task", 1.0)(x, task_ids.at[0].set(7))
        with pytest.raises(ValueError, match=r"needs task_ids"):
            _moe("task", 1.0)(x)


def test_tiled_experts_under_mesh_match_unsharded():
    # Tiny slot buffers run as one batched einsum; with the budget at 0 the experts take the
    # tiled grouped MLP (hand-written VJP, psum of weight gradients over the batch axes)
    # inside shard_map. Both layers come from the same seed, so only the expert path differs.
    inputs = _inputs()[:2]
    reference = jax.device_get(_run(_moe("tokens", 1.5), inputs))
    tiled = _moe("tokens", 1.5, max_batched_hidden_bytes=0)
    mesh = _mesh((2, 4))
    sharded = jax.device_put(inputs, parallel.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        lowered = jax.jit(lambda x, t: _loss(tiled, x, t)[0]).lower(*sharded).as_text()
    # The tiled path really runs, and inside the shard_map: a loop in its manual region.
    assert any("stablehlo.while" in region for region in _manual_regions(lowered))
    _assert_same(_run(tiled, inputs, (2, 4)), reference)


def _manual_regions(stablehlo: str) -> list[str]:
    """The bodies of the shard_map regions (sdy.manual_computation) of a lowering."""
    regions = []
    for match in re.finditer(r"sdy\.manual_computation", stablehlo):
        start = stablehlo.index("{\n", match.end())  # the region (attribute braces close)
        depth = 0
        for end in range(start, len(stablehlo)):
            depth += {"{": 1, "}": -1}.get(stablehlo[end], 0)
            if depth == 0:
                regions.append(stablehlo[start : end + 1])
                break
    return regions


@pytest.mark.parametrize(
    "routing, capacity_factor, exchange",
    [
        ("tokens", 1.0, "auto"),
        ("experts", 1.0, "auto"),
        ("task_tokens", None, "ring"),
        pytest.param("task_tokens", None, "ragged", marks=pytest.mark.slow),
    ],
    ids=("tokens-capacity", "experts-capacity", "dropless-ring", "dropless-ragged"),
)
def test_masked_moe_matches_unsharded(routing, capacity_factor, exchange, emulated_ragged):
    # Padding (part of example 1, all of example 6) is not routed;
    # on the mesh the mask travels with its examples and the same tokens are skipped.
    layer = _moe(routing, capacity_factor, num_shared_experts=1, exchange=exchange)
    inputs = _inputs()
    reference = jax.device_get(_run(layer, inputs))
    assert np.all(reference["y"][6] == 0)
    _assert_same(_run(layer, inputs, (2, 4)), reference)
