"""The multitask transformer: stems, heads, masking, placement, sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from multitask_moe import models, parallel
from multitask_moe.models.stems import MultiModalStem, TabularStem

L, P, D = 6, 4, 16
CLASSES = (3, 2, 4)
MODALITIES = ("image", "tabular", "image")


def make_model(moe=None, moa=None, moe_every=0, moa_every=0, seed=0, dtype=jnp.float32, depth=2):
    return models.MultitaskTransformer(
        task_num_classes=CLASSES,
        task_modalities=MODALITIES,
        token_shape=(L, P),
        d_model=D,
        depth=depth,
        num_heads=2,
        mlp_dim=32,
        moe=moe,
        moa=moa,
        moe_every=moe_every,
        moa_every=moa_every,
        dtype=dtype,
        rngs=nnx.Rngs(seed),
    )


def dropless_moe(routing):
    return models.MoESettings(
        num_experts=4,
        top_k=2,
        d_hidden=16,
        routing=routing,
        capacity_factor=None,
        eval_capacity_factor=None,
    )


@nnx.jit(static_argnames="deterministic")
def forward(model, inputs, mask, task_ids, deterministic=True):
    """One compile instead of op-by-op dispatch of the sparse layers."""
    return model(inputs, mask, task_ids, deterministic=deterministic)


def randomize_heads(model, seed=1):
    """Heads start at zero (uniform predictions); give them values so logits differ."""
    rng = np.random.default_rng(seed)
    model.head_kernel[...] = jnp.asarray(rng.normal(size=model.head_kernel.shape), jnp.float32)
    model.head_bias[...] = jnp.asarray(rng.normal(size=model.head_bias.shape), jnp.float32)


def make_batch(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    task_ids = np.arange(batch) % len(CLASSES)
    lengths = np.where(np.asarray(MODALITIES)[task_ids] == "image", L, 3)  # tabular: 3 tokens
    mask = np.arange(L)[None, :] < lengths[:, None]
    inputs = rng.normal(size=(batch, L, P)).astype(np.float32) * mask[..., None]
    return jnp.asarray(inputs), jnp.asarray(mask), jnp.asarray(task_ids, jnp.int32)


def test_tabular_stem_is_value_times_feature_direction_plus_offset():
    stem = TabularStem(L, D, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    inputs = np.random.default_rng(0).normal(size=(2, L, P)).astype(np.float32)
    w = np.asarray(stem.feature_embedding[...])
    b = np.asarray(stem.feature_bias[...]) + 0.5
    stem.feature_bias[...] = jnp.asarray(b)
    expected = inputs[..., :1] * w[None] + b[None]  # only feature 0 of a token is read
    np.testing.assert_allclose(stem(jnp.asarray(inputs)), expected, rtol=1e-6)


def test_multimodal_stem_picks_each_examples_modality():
    stem = MultiModalStem(
        MODALITIES, (L, P), D, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    inputs, _, task_ids = make_batch()
    out = np.asarray(stem(inputs, task_ids))
    image = np.asarray(stem.stems["image"](inputs))
    tabular = np.asarray(stem.stems["tabular"](inputs))
    for b, t in enumerate(np.asarray(task_ids)):
        np.testing.assert_array_equal(out[b], image[b] if MODALITIES[t] == "image" else tabular[b])


def test_logits_beyond_a_tasks_classes_are_masked():
    model = make_model()
    randomize_heads(model)
    inputs, mask, task_ids = make_batch()
    logits, aux = model(inputs, mask, task_ids, deterministic=True)
    assert logits.shape == (8, max(CLASSES)) and aux == {}
    for b, t in enumerate(np.asarray(task_ids)):
        assert np.all(np.asarray(logits[b, CLASSES[t] :]) == models.INVALID_CLASS_LOGIT)
        assert np.all(np.abs(np.asarray(logits[b, : CLASSES[t]])) < 1e3)
    probs = jax.nn.softmax(logits)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_each_task_reads_only_its_own_head_and_task_embedding():
    model = make_model()
    randomize_heads(model)
    inputs, mask, task_ids = make_batch()
    before = np.asarray(model(inputs, mask, task_ids, deterministic=True)[0])
    # Random directions: a constant shift would vanish in the LayerNorms.
    rng = np.random.default_rng(7)
    model.head_kernel[...] = model.head_kernel[...].at[1].add(rng.normal(size=(D, 4)))
    model.task_embedding[...] = model.task_embedding[...].at[1].add(rng.normal(size=D))
    after = np.asarray(model(inputs, mask, task_ids, deterministic=True)[0])
    is_task1 = np.asarray(task_ids) == 1
    np.testing.assert_array_equal(after[~is_task1], before[~is_task1])
    assert np.all(np.abs(after[is_task1] - before[is_task1]).max(-1) > 1e-3)


@pytest.mark.parametrize("sparse", [False, True])
def test_padding_tokens_do_not_change_the_prediction(sparse):
    # Dropless MoE: a token's output depends on itself only, so padding cannot leak in
    # through the expert capacity either.
    moe = dropless_moe("task_tokens")
    model = make_model(moe=moe if sparse else None, moe_every=1 if sparse else 0)
    randomize_heads(model)
    inputs, mask, task_ids = make_batch()
    noise = np.random.default_rng(5).normal(size=inputs.shape).astype(np.float32)
    noisy = jnp.where(mask[..., None], inputs, 100.0 * noise)
    clean_logits = forward(model, inputs, mask, task_ids)[0]
    noisy_logits = forward(model, noisy, mask, task_ids)[0]
    np.testing.assert_allclose(noisy_logits, clean_logits, rtol=1e-5, atol=1e-5)


def test_placement_of_moe_and_moa_blocks():
    moe = models.MoESettings(num_experts=4, top_k=2, d_hidden=16)
    moa = models.MoASettings(num_experts=4, top_k=2, head_dim=8)
    squad = make_model(moe=moe, moa=moa, moe_every=2, moa_every=2, depth=4)
    assert squad.sparse_layer_names() == ["block0/moa", "block1/moe", "block2/moa", "block3/moe"]
    every = make_model(moe=moe, moe_every=1, depth=3)
    assert every.sparse_layer_names() == ["block0/moe", "block1/moe", "block2/moe"]
    assert make_model(depth=3).sparse_layer_names() == []
    with pytest.raises(ValueError, match="no MoE settings"):
        make_model(moe_every=2)


def test_moe_model_has_the_dense_models_active_parameters_per_token():
    config = {
        "d_model": D,
        "depth": 2,
        "num_heads": 2,
        "mlp_dim": 32,
        "dtype": "float32",
        "param_dtype": "float32",
        "moe_every": 1,
        "moa_every": 0,
        "moe": {
            "num_experts": 4,
            "top_k": 2,
            "d_hidden": 0,
            "routing": "tokens",
            "capacity_factor": 1.25,
            "eval_capacity_factor": 2.0,
            "num_shared_experts": 0,
            "renormalize_gates": False,
            "router_noise": 0.0,
            "router_init": "normal",
            "batch_priority": False,
            "group_size": None,
            "dispatch": "index",
        },
    }
    settings = models.build.moe_settings(config)
    # top_k experts of mlp_dim / top_k hidden units = one dense MLP of mlp_dim per token.
    assert settings.d_hidden * settings.top_k == config["mlp_dim"]
    model = models.model_from_config(
        config,
        task_num_classes=CLASSES,
        task_modalities=MODALITIES,
        token_shape=(L, P),
        rngs=nnx.Rngs(0),
    )
    w_in = model.blocks[0].mlp.moe.experts.w_in
    assert w_in.shape == (4, D, 16)


def test_bfloat16_activations_give_float32_logits_close_to_the_float32_model():
    """The same parameters (float32) with bfloat16 activations: float32 logits within 3%
    of the logit scale of the float32 model's (measured 0.7%). Task routing, so no
    near-tie of a token's top-k can flip between the two precisions."""
    moe = dropless_moe("task")
    model = make_model(moe=moe, moe_every=1, dtype=jnp.bfloat16)
    reference = make_model(moe=moe, moe_every=1)
    randomize_heads(model)
    randomize_heads(reference)
    inputs, mask, task_ids = make_batch()
    logits, aux = forward(model, inputs, mask, task_ids, deterministic=False)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert set(aux) == {"block0/moe", "block1/moe"}
    logits = np.asarray(forward(model, inputs, mask, task_ids)[0])
    want = np.asarray(forward(reference, inputs, mask, task_ids)[0])
    valid = want > models.INVALID_CLASS_LOGIT / 2  # the classes of each example's task
    np.testing.assert_array_equal(logits > models.INVALID_CLASS_LOGIT / 2, valid)
    error = np.abs(logits - want)[valid].max()
    assert error <= 0.03 * np.abs(want[valid]).max(), error


@pytest.mark.parametrize("with_moa", [False, True], ids=["moe", "moe+moa"])
def test_sharded_model_equals_the_unsharded_one(with_moa):
    """Same parameters, same batch: the (2, 4)-mesh forward (experts split 4 ways, tokens
    8 ways) matches the single-device forward, capacity drops included."""
    batch = 16
    # One routing group per device's share (2 examples x L tokens), as training sets it.
    moe = models.MoESettings(
        num_experts=8,
        top_k=2,
        d_hidden=16,
        routing="task_tokens",
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        group_size=2 * L,
    )
    moa = models.MoASettings(num_experts=4, top_k=2, head_dim=8, routing="task_tokens")
    kwargs = dict(
        moe=moe, moa=moa if with_moa else None, moe_every=2, moa_every=2 if with_moa else 0, depth=2
    )
    layers = ["block0/moa", "block1/moe"] if with_moa else ["block1/moe"]
    reference = make_model(**kwargs)
    randomize_heads(reference)
    inputs, mask, task_ids = make_batch(batch)
    ref_logits, ref_aux = forward(reference, inputs, mask, task_ids)

    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):
        sharded = make_model(**kwargs)
        leaves, treedef = jax.tree.flatten(nnx.state(sharded))
        reference_leaves = jax.tree.leaves(nnx.state(reference))
        nnx.update(
            sharded,
            treedef.unflatten(
                [
                    jax.device_put(ref, leaf.sharding)
                    for ref, leaf in zip(reference_leaves, leaves, strict=True)
                ]
            ),
        )
        w_in = sharded.blocks[1].mlp.moe.experts.w_in[...]
        assert w_in.sharding.spec[0] == "expert"
        spec = parallel.batch_sharding(mesh)
        args = [jax.device_put(a, spec) for a in (inputs, mask, task_ids)]
        logits, aux = forward(sharded, *args)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert sorted(aux) == layers
    for layer in layers:
        np.testing.assert_allclose(
            aux[layer]["load_balance_loss"], ref_aux[layer]["load_balance_loss"], rtol=1e-5
        )
        np.testing.assert_array_equal(aux[layer]["expert_counts"], ref_aux[layer]["expert_counts"])
    assert float(ref_aux["block1/moe"]["dropped_fraction"]) > 0  # capacity really bites
