"""models.Owners (who owns each leaf or slice of a state) and the freeze modes built on it,
against hand-written references: no model, no compile."""

import numpy as np
import optax
import pytest

from multitask_moe import models
from multitask_moe.models.keys import flatten, unflatten

RNG = np.random.default_rng(0)
# A leaf cut along axis 1 into three slots, two of them owned; a whole leaf; an unowned one.
FLAT = {
    ("moe", "kernel"): RNG.normal(size=(2, 3, 4)).astype(np.float32),
    ("norm", "scale"): RNG.normal(size=(4,)).astype(np.float32),
    ("moe", "active"): np.array([True, False, True]),
}
OWNERS = models.Owners(
    whole=lambda path: None if path[-1] == "active" else "shared",
    sliced={("moe", "kernel"): (1, {0: "expert0", 2: "expert2"})},
)


def test_split_and_join_are_inverse_slot_by_slot():
    parts = OWNERS.split(FLAT)
    assert set(parts) == {"shared", "expert0", "expert2"}
    kernel = FLAT[("moe", "kernel")]
    np.testing.assert_array_equal(parts["expert2"][("moe", "kernel")], kernel[:, 2])
    np.testing.assert_array_equal(parts["shared"][("norm", "scale")], FLAT[("norm", "scale")])
    fresh = np.zeros_like(kernel)
    joined = OWNERS.joined(
        ("moe", "kernel"), fresh, lambda o: parts.get(o, {}).get(("moe", "kernel"))
    )
    expected = fresh.copy()
    for k in (0, 2):  # the reference: a loop over the owned slots; slot 1 stays fresh
        expected[:, k] = kernel[:, k]
    np.testing.assert_array_equal(joined, expected)
    # An owner without a part (no optimizer state yet) leaves the fresh values there.
    np.testing.assert_array_equal(OWNERS.joined(("moe", "kernel"), fresh, lambda o: None), fresh)
    active = FLAT[("moe", "active")]
    assert OWNERS.joined(("moe", "active"), active, lambda o: 1 / 0) is active


def test_masks_follow_the_owners_flags_with_one_shape_per_leaf():
    flags = {"shared": False, "expert0": True, "expert2": False}
    mask = OWNERS.mask(("moe", "kernel"), (2, 3, 4), flags)
    assert mask.shape == (1, 3, 1)
    np.testing.assert_array_equal(mask.ravel(), [True, False, False])
    assert not OWNERS.mask(("norm", "scale"), (4,), flags)
    assert not OWNERS.mask(("moe", "active"), (3,), flags)  # nobody's: never trains


def test_moments_are_cut_and_restored_with_their_parameters():
    params = unflatten({p: v for p, v in FLAT.items() if v.dtype == np.float32})
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = unflatten({p: np.ones_like(v) for p, v in flatten(params).items()})
    _, opt_state = tx.update(grads, opt_state, params)
    moments = OWNERS.moments(opt_state)
    mu = flatten(opt_state[0].mu)
    np.testing.assert_array_equal(
        moments["expert0"][("mu", ("moe", "kernel"))], mu[("moe", "kernel")][:, 0]
    )
    assert set(moments["shared"]) == {("mu", ("norm", "scale")), ("nu", ("norm", "scale"))}
    restored = OWNERS.with_moments(tx.init(params), moments)
    nu, restored_nu = flatten(opt_state[0].nu), flatten(restored[0].nu)
    np.testing.assert_array_equal(restored_nu[("norm", "scale")], nu[("norm", "scale")])
    np.testing.assert_array_equal(restored_nu[("moe", "kernel")][:, 2], nu[("moe", "kernel")][:, 2])
    assert not np.any(restored_nu[("moe", "kernel")][:, 1])  # the free slot: fresh zeros


@pytest.mark.parametrize("statistics", [False, True])
def test_freeze_modes_against_their_definitions(statistics):
    """Three tasks, task 2 new; a task table, an expert table and a new task's stem."""
    params = {
        "task_embedding": np.zeros((3, 4)),
        "experts": np.zeros((5, 4)),
        "norm": np.zeros((4,)),
        "text_stem": np.zeros((3, 4)),
    }
    tags = {("task_embedding",): {"task_axis": 0}, ("experts",): {"expert_axis": 0}}
    tags[("text_stem",)] = {"task_axis": 0}

    def mask(mode):
        tree = models.trainable_mask(
            params, tags, mode, new_tasks=(2,), new_paths=[("text_stem",)], statistics=statistics
        )
        return {k: np.broadcast_to(v, params[k].shape) for k, v in tree.items()}

    assert all(m.all() for m in mask("none").values())
    experts = mask("experts")
    assert experts["experts"].all() == statistics and experts["norm"].all()
    shared = mask("shared")
    np.testing.assert_array_equal(shared["task_embedding"][:, 0], [False, False, True])
    assert shared["text_stem"].all()  # what the old model did not have trains whole
    assert shared["norm"].all() == statistics and shared["experts"].all() == statistics
    with pytest.raises(ValueError, match="freeze='rows' is not allowed"):
        models.trainable_mask(params, tags, "rows")
