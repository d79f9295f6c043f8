"""The bookkeeping of muNet evolution against hand-computed values and closed forms:
parameter accounting and score, parent sampling frequencies, locks, mutations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from multitask_moe import evolution as ev


def pool_of_sizes(*sizes_and_locks):
    pool = ev.ComponentPool()
    ids = [
        pool.add(f"c{i}", {"w": np.zeros(size, np.float32)}, locks=locks)
        for i, (size, locks) in enumerate(sizes_and_locks)
    ]
    return pool, ids


def test_accounting_divides_each_component_by_the_tasks_sharing_it():
    pool, ids = pool_of_sizes((100, {"root"}), (60, {"root", "a"}), (30, set()), (12, {"t"}))
    # 100 / |{root, t}| + 60 / |{root, a, t}| + 30 / |{t}| + 12 / |{t}|: the task itself
    # is counted once whether or not it already holds a lock.
    assert ev.accounted_params(tuple(ids), pool, "t") == pytest.approx(50 + 20 + 30 + 12)
    assert ev.score(0.8, 112.0, 224.0, 0.5) == pytest.approx(0.8 * 0.5**0.5)
    assert ev.score(0.8, 500.0, 224.0, 1.0) == 0.8  # s = 1: no size penalty
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            ev.score(0.8, 1.0, 1.0, bad)


def test_parent_sampling_frequencies_match_the_walk():
    paths = [
        ev.Path(0, "t", (), {}, score=0.9, children=2),
        ev.Path(1, "t", (), {}, score=0.7, children=0),
        ev.Path(2, "t", (), {}, score=0.95, children=3),
    ]
    seeds = [ev.Path(3, "other", (), {}, score=0.5, children=1)]
    # By hand: order 2 (0.125), 0 (0.25), 1 (1.0): 1 always accepts if reached, so the
    # seeds and the uniform pick are never reached.
    want = {2: 0.125, 0: 0.875 * 0.25, 1: 0.875 * 0.75, 3: 0.0}
    assert ev.parent_probabilities(paths, seeds) == pytest.approx(want)
    paths[1].children = 1  # now every acceptance < 1: mass reaches the seeds and uniform
    exact = ev.parent_probabilities(paths, seeds)
    assert sum(exact.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    draws = [ev.sample_parent(rng, paths, seeds).id for _ in range(20_000)]
    for path_id, probability in exact.items():
        assert np.mean(np.asarray(draws) == path_id) == pytest.approx(probability, abs=0.01)
    with pytest.raises(ValueError, match="no path to sample"):
        ev.sample_parent(rng, [], [])


def test_locked_components_cannot_change_and_clones_share_nothing():
    pool, (root, trained) = pool_of_sizes((4, {"root"}), (3, set()))
    pool[trained].opt_state = {"momentum": np.ones(3, np.float32)}
    with pytest.raises(ev.LockedComponentError, match="locked by \\['root'\\]"):
        pool.update(root, {"w": np.ones(4, np.float32)})
    copy = pool.clone(trained)
    assert pool[copy].trainable and pool[copy].origin == trained
    pool[copy].params["w"][:] = 7.0
    pool[copy].opt_state["momentum"][:] = 0.0
    assert (pool[trained].params["w"] == 0).all() and (
        pool[trained].opt_state["momentum"] == 1
    ).all()
    pool.lock([trained], "a")
    pool.drop([root, trained, copy])  # only the unlocked clone goes
    assert root in pool and trained in pool and copy not in pool
    assert pool.add("new", {}) == 3  # ids are never reused


def test_mutations_step_one_rung_and_clone_what_they_must():
    rng = np.random.default_rng(0)
    ladder = (1e-3, 3e-3, 1e-2)
    moves = {ev.step(rng, "lr", 3e-3, ladder) for _ in range(200)}
    assert moves == {1e-3, 1e-2}
    assert {ev.step(rng, "lr", 1e-2, ladder) for _ in range(200)} == {3e-3, 1e-2}  # clamped
    with pytest.raises(ValueError, match="not on its ladder"):
        ev.step(rng, "lr", 5e-3, ladder)
    hparams = {"mu": 0.3, "lr": 3e-3}
    changed = [
        ev.mutate_hparams(rng, hparams, {"lr": ladder, "mu": ev.MU_LADDER}) for _ in range(4000)
    ]
    assert np.mean([c["lr"] != 3e-3 for c in changed]) == pytest.approx(0.3, abs=0.03)
    assert all(0.1 <= c["mu"] <= 0.3 for c in changed)

    pool, ids = pool_of_sizes((4, {"root"}), (4, {"root"}), (4, set()))
    norm = pool.add("final_norm", {}, locks={"root"})
    actions = [ev.component_actions(rng, [*ids, norm], pool, mu=0.2) for _ in range(4000)]
    cloned = np.mean([[a == ev.CLONE for _, a in row] for row in actions], axis=0)
    np.testing.assert_allclose(cloned[:2], 0.2, atol=0.03)  # locked: cloned with prob. mu
    assert cloned[2] == 1.0 and cloned[3] == 1.0  # trainable in the parent; final norm


class _CountingSteps:
    """Fake child steps: w counts the steps. From step `limit` on w and the loss are NaN
    (a blow-up); at step `spike` alone the loss is NaN (w goes on); from step `poison` on
    w is NaN and the loss still finite (non-finite gradients, a finite loss before them).
    Validation accuracy is w / 100, so every validation before a failure improves."""

    @staticmethod
    def _step(state):
        w = state["w"] + 1
        w = jnp.where((w >= state["limit"]) | (w >= state["poison"]), jnp.nan, w)
        loss = jnp.where(
            (w >= state["limit"]) | jnp.isnan(w) & (state["poison"] > 90), jnp.nan, 0.5
        )
        loss = jnp.where(state["w"] + 1 == state["spike"], jnp.nan, loss)
        return {**state, "w": w}, loss

    def train_step(self, state, opt_state, batch, trainable):
        state, loss = self._step(state)
        return state, opt_state, loss.squeeze()

    def train_steps(self, state, opt_state, batch, trainable):  # [g, 1] leaves
        state, loss = self._step(state)
        return state, opt_state, loss[:, 0]

    def eval_steps(self, state, batch):
        w = jnp.nan_to_num(state["w"][:, 0])
        return w, jnp.full_like(w, 100.0), None


def _fake_child(limit=99.0, spike=99.0, poison=99.0):
    def full(value):
        return np.full(1, value, np.float32)

    return {"w": full(0.0), "limit": full(limit), "spike": full(spike), "poison": full(poison)}


def test_a_diverging_child_keeps_its_best_point_before_and_names_the_step():
    from multitask_moe.evolution import child as child_lib
    from multitask_moe.evolution import together

    steps = _CountingSteps()
    zeros = np.zeros(1, np.float32)
    batches = iter(lambda: {"x": zeros}, None)

    def alone(**fake):  # validations at steps 3 and 6
        return child_lib.train(
            steps, _fake_child(**fake), (), {}, batches,
            lambda s: float(np.nan_to_num(s["w"][0])) / 100, num_steps=6, validations=2,
        )  # fmt: skip

    blown = alone(limit=5.0)  # loss and w NaN from step 5
    assert blown.diverged_at == 5 and blown.quality == pytest.approx(0.03)
    assert blown.state["w"][0] == 3
    spike = alone(spike=2.0)  # the loss of step 2 alone, between validations
    assert spike.diverged_at == 2 and spike.quality == 0.0 and spike.state["w"][0] == 0
    poisoned = alone(poison=4.0)  # w NaN from step 4, every loss finite
    assert poisoned.diverged_at == 6 and poisoned.quality == pytest.approx(0.03)
    assert poisoned.state["w"][0] == 3
    # Together (one per device), validations at 2, 4, 6, 8.
    fakes = [_fake_child(limit=3.0), _fake_child(), _fake_child(poison=5.0)]
    results = together.train(
        steps, fakes, [()] * 3, [{}] * 3, [batches] * 3,
        lambda: iter([{"x": zeros}]), num_steps=8, validations=4,
    )  # fmt: skip
    assert [r.diverged_at for r in results] == [3, None, 6]
    assert [r.quality for r in results] == pytest.approx([0.02, 0.08, 0.04])
    assert [float(r.state["w"][0]) for r in results] == [2.0, 8.0, 4.0]
