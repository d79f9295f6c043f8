"""Training a generation's children at once (mu2Net): those of one architecture, either
stacked one per device in one vmapped program, or each on its own group of devices with
its sparse (MoE, MoA) layers expert-parallel over the group.

    results = together.train(steps, states, opt_states, masks, batches, validation,
                             num_steps=..., validations=..., devices_per_child=1)

Each child validates `validations` times and keeps the parameters of its best point, as
child.train does for one; a child whose loss or parameters turn non-finite stops
improving there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multitask_moe import parallel
from multitask_moe.evolution import child
from multitask_moe.models.keys import adam_moment_key, axis_tags, key_names
from multitask_moe.models.surgery import select


def _rows(keep, new, old):
    """Per child (leading axis): new where keep[c], else old."""

    def pick(n, o):
        return select(keep.reshape((-1,) + (1,) * (jnp.ndim(n) - 1)), n, o)

    return jax.tree.map(pick, new, old)


def _stack(trees, sharding):
    return jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *trees), sharding)


# A runner holds g children on the devices: step() trains each one step and gives their
# losses, finite() and evaluate() measure each, keep() makes the current point the best
# one of the children named, best(c) gives child c's best (state, opt_state).


class _Stacked:
    """g children stacked on a leading axis sharded over g devices, one per device (as
    mu2Net): one vmapped program per (architecture, g)."""

    def __init__(self, steps: child.ChildSteps, states, opt_states, trainables):
        count, devices = len(states), jax.devices()
        if count > len(devices):
            raise ValueError(
                f"{count} children of one architecture; at most {len(devices)} devices"
            )
        mesh = jax.sharding.Mesh(
            np.array(devices[:count]), ("child",), axis_types=(jax.sharding.AxisType.Auto,)
        )
        self.rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("child"))
        self.steps, self.count = steps, count
        self.state = _stack(states, self.rows)
        self.opt_state = _stack(opt_states, self.rows)
        self.trainable = _stack(trainables, self.rows)
        self.best_state, self.best_opt = self.state, self.opt_state

    def step(self, batches: list[dict]) -> jax.Array:
        """One step of every child; their losses [g]."""
        batch = _stack(batches, self.rows)
        self.state, self.opt_state, loss = self.steps.train_steps(
            self.state, self.opt_state, batch, self.trainable
        )
        return loss

    def finite(self) -> np.ndarray:
        return np.asarray(child.finite_rows(self.state, self.count))

    def evaluate(self, batches) -> tuple[np.ndarray, np.ndarray]:
        """(correct [g], total [g]) over `batches` (the same for every child)."""
        correct, total = np.zeros(self.count), np.zeros(self.count)
        for batch in batches:
            c, n, _ = self.steps.eval_steps(self.state, batch)
            correct, total = correct + np.asarray(c), total + np.asarray(n)
        return correct, total

    def keep(self, improved: np.ndarray) -> None:
        """The current point becomes the best one of the children in `improved`."""
        keep = jax.device_put(improved, self.rows)
        self.best_state = _rows(keep, self.state, self.best_state)
        self.best_opt = _rows(keep, self.opt_state, self.best_opt)

    def best(self, c: int) -> tuple[dict, object]:
        def pick(x):
            return x[c]

        return jax.tree.map(pick, self.best_state), jax.tree.map(pick, self.best_opt)


class _Grouped:
    """g children, each on its own group of n devices whose mesh has an 'expert' axis: the
    sparse layers of a child run expert-parallel there (parallel/expert_parallel.py), its
    experts split n ways, its batches too. Child c holds devices [c * n, (c + 1) * n).
    The children's steps are dispatched one after another without waiting, so the groups
    compute at the same time (asynchronous dispatch, as mu2Net). All children run one
    traced program; XLA compiles it once per group, since an executable is bound to its
    devices."""

    def __init__(self, steps: child.ChildSteps, states, opt_states, trainables, per_child: int):
        count, devices = len(states), jax.devices()
        if count * per_child > len(devices):
            raise ValueError(
                f"{count} children of {per_child} devices each need {count * per_child} "
                f"devices; there are {len(devices)}"
            )
        self.steps, self.count = steps, count
        self.meshes = [
            parallel.make_mesh(
                {parallel.EXPERT_AXIS: per_child},
                devices[c * per_child : (c + 1) * per_child],
                axis_types=(jax.sharding.AxisType.Auto,),
            )
            for c in range(count)
        ]
        self.state, self.opt_state, self.trainable = [], [], []
        for mesh, state, opt_state, trainable in zip(
            self.meshes, states, opt_states, trainables, strict=True
        ):
            state_sharding, opt_sharding = expert_shardings(mesh, state, opt_state)
            self.state.append(jax.device_put(state, state_sharding))
            self.opt_state.append(jax.device_put(opt_state, opt_sharding))
            self.trainable.append(jax.device_put(trainable, _replicated(mesh)))
        self.best_state, self.best_opt = list(self.state), list(self.opt_state)

    def step(self, batches: list[dict]) -> list[jax.Array]:
        losses = []
        for c, mesh in enumerate(self.meshes):
            batch = jax.device_put(batches[c], parallel.batch_sharding(mesh))
            with jax.set_mesh(mesh):  # the layers read it while tracing
                self.state[c], self.opt_state[c], loss = self.steps.train_step(
                    self.state[c], self.opt_state[c], batch, self.trainable[c]
                )
            losses.append(loss)
        return losses

    def finite(self) -> np.ndarray:
        # Every group's check is dispatched before any result is read: the groups overlap.
        checks = [child.finite_rows(state, None) for state in self.state]
        return np.array([bool(check) for check in checks])

    def evaluate(self, batches) -> tuple[np.ndarray, np.ndarray]:
        counts = []  # every group's counts dispatched before any is read
        for batch in batches:
            for c, mesh in enumerate(self.meshes):
                placed = jax.device_put(batch, parallel.batch_sharding(mesh))
                with jax.set_mesh(mesh):
                    right, n, _ = self.steps.eval_step(self.state[c], placed)
                counts.append((c, right, n))
        correct, total = np.zeros(self.count), np.zeros(self.count)
        for c, right, n in counts:
            correct[c] += int(right)
            total[c] += int(n)
        return correct, total

    def keep(self, improved: np.ndarray) -> None:
        for c in np.flatnonzero(improved):
            self.best_state[c], self.best_opt[c] = self.state[c], self.opt_state[c]

    def best(self, c: int) -> tuple[dict, object]:
        return self.best_state[c], self.best_opt[c]


def _replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def expert_shardings(mesh: jax.sharding.Mesh, state: Mapping[str, nnx.State], opt_state):
    """Shardings of a child's state and opt_state on its group's mesh, as training places
    a model: a parameter with an expert axis (its `expert_axis` tag: an MoE or MoA
    layer's per-expert weights) split over 'expert', and its Adam moments alike, so each
    device holds its own experts; everything else, statistics included, replicated.
    Raises ValueError when the experts do not split evenly over the group."""
    size = mesh.shape[parallel.EXPERT_AXIS]
    axes = {
        key_names(path): tags["expert_axis"]
        for path, tags in axis_tags(state["params"]).items()
        if tags.get("expert_axis") is not None
    }

    def spec(path: tuple, leaf) -> jax.sharding.NamedSharding:
        axis = axes.get(path)
        if axis is None:
            return _replicated(mesh)
        if np.shape(leaf)[axis] % size:
            raise ValueError(
                f"{'.'.join(map(str, path))} holds {np.shape(leaf)[axis]} experts; they do "
                f"not split over a group of {size} devices"
            )
        parts = [None] * axis + [parallel.EXPERT_AXIS]
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*parts))

    params = jax.tree_util.tree_map_with_path(
        lambda key_path, leaf: spec(key_names(key_path), leaf), state["params"]
    )
    statistics = jax.tree.map(lambda _: _replicated(mesh), state["model_state"])

    def moment_spec(key_path, leaf):
        key = adam_moment_key(key_path)
        return spec(key[1], leaf) if key else _replicated(mesh)

    shardings = {"params": params, "model_state": statistics}
    return shardings, jax.tree_util.tree_map_with_path(moment_spec, opt_state)


def programs(count: int, devices_per_child: int) -> set[tuple]:
    """The compiled train programs `train` runs for `count` children of one architecture
    (each with its eval program): one stacked program for the count, or one per device
    group, since an executable is bound to its devices."""
    if devices_per_child == 1:
        return {("stacked", count)}
    return {("group", c) for c in range(count)}


def train(
    steps: child.ChildSteps,
    states: list[dict],
    opt_states: list,
    trainables: list[dict],
    batches: list[Iterator[dict[str, np.ndarray]]],
    validation: Callable[[], Iterator[dict[str, np.ndarray]]],
    *,
    num_steps: int,
    validations: int,
    devices_per_child: int = 1,
) -> list[child.Trained]:
    """child.train for g children of one architecture at once: one per device (stacked,
    one program), or one per group of `devices_per_child` devices with its sparse (MoE,
    MoA) layers expert-parallel over the group. Each child keeps its own best point; a child whose
    loss or parameters turn non-finite stops improving (quality 0 if it never validated)."""
    if devices_per_child == 1:
        runner = _Stacked(steps, states, opt_states, trainables)
    else:
        runner = _Grouped(steps, states, opt_states, trainables, devices_per_child)
    count = len(states)
    every = max(num_steps // max(validations, 1), 1)
    best = np.full(count, -1.0)
    failed = np.zeros(count, bool)
    diverged = np.zeros(count, np.int64)  # the validation step that first saw it (0: none)
    losses = []
    for step in range(1, num_steps + 1):
        losses.append(runner.step([next(b) for b in batches]))
        if step % every == 0 or step == num_steps:
            finite = np.isfinite(_on_host(losses[-every:])).all(axis=0) & runner.finite()
            diverged = np.where(~finite & ~failed & (diverged == 0), step, diverged)
            failed |= ~finite
            correct, total = runner.evaluate(validation())
            quality = correct / np.maximum(total, 1)
            improved = (quality > best) & ~failed
            runner.keep(improved)
            best = np.where(improved, quality, best)
    history = _on_host(losses)  # [steps, g]
    return [
        child.Trained(
            *runner.best(c),
            float(max(best[c], 0.0)),
            history[:, c].tolist(),
            child.first_nonfinite_step(history[:, c].tolist()) or (int(diverged[c]) or None),
        )
        for c in range(count)
    ]


def _on_host(losses: list) -> np.ndarray:
    """[steps, g] float32 losses: each step's [g] array or list of g scalars."""
    return np.array([np.asarray(step) for step in losses], np.float32)
