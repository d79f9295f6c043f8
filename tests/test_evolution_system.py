"""The evolving system on the project's model: locks hold, earlier tasks stay
bit-identical, scores are the formula's, the checkpoint round-trips, a killed run resumes.

One tiny dense system (tabular tasks, d_model 16, 2 blocks) is built once for the module;
the command-line runs (slow-marked) use the config's MoE block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from multitask_moe.core import config_lib
from multitask_moe.evolution import System, path_model, paths
from multitask_moe.evolution.store import SystemCheckpoints
from multitask_moe.evolve import evolve, settings_from_config
from multitask_moe.models.keys import adam_moment_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "evolve.tasks": "iris, wine",
    "evolve.generations": 1,
    "evolve.children": 2,
    "evolve.steps": 12,
    "evolve.validations": 2,
    "model.d_model": 16,
    "model.mlp_dim": 16,
    "model.moe_every": 0,
    "batch_size": 16,
    "eval_batch_size": 64,
}


def tiny_config(**changes):
    config = config_lib.sibling_config(os.path.join(REPO, "configs", "x.py"), "evolve")
    return config_lib.set_fields(config, {**TINY, **changes})


def locked_arrays(system: System) -> dict:
    return {
        (c.id, path): np.array(value)
        for c in system.pool
        if c.locks
        for path, value in c.params.items()
    }


@pytest.fixture(scope="module")
def grown():
    """The system after its first task and after its second, with what was seen between."""
    system = System(settings_from_config(tiny_config()))
    first = system.evolve_task("iris")
    logits = system.test_logits("iris")
    locked = locked_arrays(system)
    second = system.evolve_task("wine")
    return system, first, second, logits, locked


def test_earlier_task_is_bit_identical_after_a_new_one(grown):
    system, first, _, logits, _ = grown
    np.testing.assert_array_equal(system.test_logits("iris"), logits)
    assert system.records["iris"]["test_accuracy_now"] == first["test_accuracy_when_added"]


def test_no_locked_parameter_changes(grown):
    system, _, second, _, locked = grown
    now = locked_arrays(system)
    for key, value in locked.items():
        np.testing.assert_array_equal(now[key], value)  # still alive, same bits
    # ... while evolving the second task did train: a component it cloned differs from
    # the one it was cloned from (were training a no-op, the check above would hold too).
    cloned = [system.pool[c["id"]] for c in second["components"].values() if c["kind"] != "reused"]
    trained = [
        c
        for c in cloned
        if c.origin in system.pool
        and any(not np.array_equal(v, system.pool[c.origin].params[p]) for p, v in c.params.items())
    ]
    assert trained, [(c.name, c.origin) for c in cloned]


def test_scores_follow_the_formula(grown):
    system, first, second, _, _ = grown
    for task, record, later in (("iris", first, {"wine"}), ("wine", second, set())):
        path = system.paths[record["path"]]
        by_hand = 0.0
        for cid in path.components:  # the sharing when the task was added
            component = system.pool[cid]
            by_hand += component.size / len((component.locks - later) | {task})
        assert record["accounted_params"] == pytest.approx(by_hand)
        assert record["score"] == pytest.approx(
            paths.score(record["quality"], by_hand, system.root_params, 1.0)
        )
        assert all(task in system.pool[c].locks for c in path.components)
    # The root is never trainable; every component the second task reuses is locked.
    assert all(not system.pool[c].trainable for c in system.paths[system.root].components)
    reused = [c["id"] for c in second["components"].values() if c["kind"] == "reused"]
    assert all(system.pool[c].locks - {"wine"} for c in reused)


def test_checkpoint_round_trip(grown, tmp_path):
    system, *_ = grown
    checkpoints = SystemCheckpoints(str(tmp_path / "system"))
    checkpoints.save(1, system)
    restored = checkpoints.restore(system.settings)
    checkpoints.close()
    assert restored.best == system.best and restored.progress == system.progress
    assert {c.id: (c.name, c.locks) for c in restored.pool} == {
        c.id: (c.name, c.locks) for c in system.pool
    }
    for task in system.best:
        np.testing.assert_array_equal(restored.test_logits(task), system.test_logits(task))
    for component in system.pool:  # every stored Adam moment, value for value
        opt = restored.pool[component.id].opt_state or {}
        assert opt.keys() == (component.opt_state or {}).keys()
        for key, value in opt.items():
            np.testing.assert_array_equal(value, component.opt_state[key])
    assert restored.rng.random() == system.rng.random()


def test_an_unreadable_system_step_is_moved_aside_and_the_one_before_restores(grown, tmp_path):
    """The system's checkpoints go through training's checkpoint layer: a damaged latest
    generation is moved to system.unreadable/ with one warning, and the one before
    restores whole."""
    system, *_ = grown
    directory = tmp_path / "system"
    checkpoints = SystemCheckpoints(str(directory))
    checkpoints.save(1, system)
    checkpoints.save(2, system)
    checkpoints.close()
    arrays = list((directory / "2" / "arrays").glob("**/d/*"))  # the array data files
    with open(max(arrays, key=lambda p: p.stat().st_size), "r+b") as f:  # a write cut short
        f.truncate(64)
    warnings = []
    checkpoints = SystemCheckpoints(str(directory))
    restored = checkpoints.restore(system.settings, warn=warnings.append)
    assert checkpoints.latest_step() == 1
    checkpoints.close()
    assert len(warnings) == 1 and "checkpoint step 2" in warnings[0]
    assert (tmp_path / "system.unreadable" / "2").is_dir()
    for task in system.best:
        np.testing.assert_array_equal(restored.test_logits(task), system.test_logits(task))


def test_a_checkpoint_with_moments_keyed_by_the_variables_value_restores(grown, tmp_path):
    """Older system checkpoints hold the Adam moments under the nnx Variable's `.value`
    path, and with expert slots a block held moments of leaves it does not own; they
    restore keyed like the parameters, each component with its own."""
    system, *_ = grown
    moments = {c.id: c.opt_state for c in system.pool if c.opt_state}
    assert moments and all(
        path in system.pool[cid].params for cid, opt in moments.items() for _, path in opt
    )
    stray = np.zeros(3, np.float32)
    try:
        for cid, opt in moments.items():
            old = {(s, (*p, "value")): v for (s, p), v in opt.items()}
            system.pool[cid].opt_state = {**old, ("mu", ("not", "its", "leaf")): stray}
        checkpoints = SystemCheckpoints(str(tmp_path / "system"))
        checkpoints.save(1, system)
    finally:
        for cid, opt in moments.items():
            system.pool[cid].opt_state = opt
    restored = checkpoints.restore(system.settings)
    checkpoints.close()
    for cid, opt in moments.items():
        assert restored.pool[cid].opt_state.keys() == opt.keys()
        for key, value in opt.items():
            np.testing.assert_array_equal(restored.pool[cid].opt_state[key], value)


def test_an_expert_cloned_into_a_free_slot_trains_alone_and_old_routing_never_sees_it(
    tmp_path,
):
    """free_expert_slots: each expert of an MoE block is its own component (its MLP slice,
    router column and usage). A child of the first task's path that clones one expert into
    a free slot starts with a copy equal to its origin, trains the copy (one compiled step
    for every active set) while the reused experts and the rest of the locked block keep
    their bits, and the first task, which has no such slot, keeps its logits bit for bit;
    the system checkpoint round-trips the slots."""
    import jax

    changes = {"model.moe_every": 2, "evolve.free_expert_slots": 2}
    system = System(settings_from_config(tiny_config(**changes)))
    root = system.arch[system.root]
    assert (root.expert_slots, root.experts) == (6, ((1, (0, 1, 2, 3)),))
    system.evolve_task("iris")
    logits, locked = system.test_logits("iris"), locked_arrays(system)
    parent = system.best["iris"]
    for _ in range(60):  # each child clones an expert with probability mu
        child, trainable = system.mutate(parent, "wine")
        if 4 in dict(system.arch[child].experts).get(1, ()):
            break
    assert dict(system.arch[child].experts)[1] == (*dict(system.arch[parent].experts)[1], 4)
    named = system.named_components(child)
    copy = system.pool[named["block1.expert4"]]
    origin = system.pool[copy.origin]
    assert copy.name == "block1.expert4" and trainable[copy.name]
    assert origin.locks and origin.name.startswith("block1.expert")
    assert any(path[-2:] == ("router", "kernel") for path in copy.params)
    for path, value in origin.params.items():
        np.testing.assert_array_equal(copy.params[path], value)
    if origin.opt_state:  # a trained origin (not the root's): the copy has its moments
        assert copy.opt_state.keys() == origin.opt_state.keys()
        for key, value in origin.opt_state.items():
            np.testing.assert_array_equal(copy.opt_state[key], value)
    reused = [n for n, cid in named.items() if system.pool[cid].locks]
    assert reused and not any(trainable[n] for n in reused)
    arch = system.arch[child]
    other = dataclasses.replace(arch, experts=root.experts)  # another active set
    assert system.steps_for(arch) is system.steps_for(other)  # no new compile
    _, fresh = path_model.build(system.settings.model, arch, system.token_shape, 0)
    masks = [
        path_model.leaf_trainable(fresh, dict.fromkeys(a.component_names(), True), a)
        for a in (arch, other)
    ]
    assert jax.tree.map(np.shape, masks[0]) == jax.tree.map(np.shape, masks[1])

    system.train_child(child, trainable, num_steps=4)
    trained = system.pool[named["block1.expert4"]]
    assert any(not np.array_equal(trained.params[p], v) for p, v in origin.params.items())
    # It keeps its own Adam moments: its slice of each expert leaf's, not the block's.
    assert {path for _, path in trained.opt_state} == set(trained.params)
    for (_, path), value in trained.opt_state.items():
        assert value.shape == trained.params[path].shape
    # A child of that path clones the copy (its parent still trains it), moments and all,
    # and starts training with them in slot 4 of the layer's moments.
    for _ in range(60):
        grandchild, grand_trainable = system.mutate(child, "wine")
        if "block1.expert4" in system.named_components(grandchild):
            break
    inherited = system.pool[system.named_components(grandchild)["block1.expert4"]]
    assert inherited.origin == trained.id
    state, opt_state, _, _ = system._prepare(grandchild, grand_trainable)
    sliced = path_model.owners(system.arch[grandchild], state).sliced
    slot_axes = {path: axis for path, (axis, _) in sliced.items()}
    moments = {
        key: np.asarray(leaf)
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if (key := adam_moment_key(key_path)) in trained.opt_state
    }
    assert moments.keys() == trained.opt_state.keys()
    for key, value in trained.opt_state.items():
        np.testing.assert_array_equal(np.take(moments[key], 4, axis=slot_axes[key[1]]), value)
    np.testing.assert_array_equal(system.test_logits("iris"), logits)
    iris_state = path_model.flatten(system.state_of(parent)["model_state"])
    (active,) = [v for p, v in iris_state.items() if p[-1] == "active_experts"]
    assert not np.asarray(active)[4:].any()  # the first task never routes to slot 4
    now = locked_arrays(system)
    for key, value in locked.items():
        np.testing.assert_array_equal(now[key], value)

    checkpoints = SystemCheckpoints(str(tmp_path / "system"))
    checkpoints.save(1, system)
    restored = checkpoints.restore(system.settings)
    checkpoints.close()
    assert restored.arch == system.arch
    np.testing.assert_array_equal(restored.test_logits("iris"), logits)


def test_children_on_device_groups_run_expert_parallel_and_train_as_one_device_each():
    """devices_per_child=4: a generation's two children train at once, each on its own 4
    of the 8 devices with its MoE experts split over them (8 expert slots, 2 per device).
    Against the same two children trained one per device (the stacked program, no expert
    parallelism) on the same batches: equal qualities, losses, experts and validation
    logits equal to float32 round-off, the locked leaves bit for bit; each child's experts
    and their Adam moments sit on its own group, a quarter on each device."""
    import jax

    from multitask_moe import parallel
    from multitask_moe.evolution import child as child_lib
    from multitask_moe.evolution import together
    from multitask_moe.parallel import hlo

    changes = {"model.moe_every": 2, "evolve.free_expert_slots": 4, "evolve.steps": 6}
    system = System(settings_from_config(tiny_config(**changes)))
    by_shape: dict = {}
    while not any(len(same) == 2 for same in by_shape.values()):  # two of one architecture
        child, trainable = system.mutate(system.root, "iris")
        by_shape.setdefault(system.arch[child].shapes, []).append((child, trainable))
    (children,) = [same for same in by_shape.values() if len(same) == 2]
    prepared = [system._prepare(child, trainable) for child, trainable in children]
    steps = system.steps_for(system.arch[children[0][0]])
    batches = [[next(p[3]) for _ in range(6)] for p in prepared]
    validation = system._validation("iris")
    results = {}
    for per_child in (1, 4):
        results[per_child] = together.train(
            steps,
            [p[0] for p in prepared],
            [p[1] for p in prepared],
            [p[2] for p in prepared],
            [iter(b) for b in batches],
            validation,
            num_steps=6,
            validations=2,
            devices_per_child=per_child,
        )
    devices = jax.devices()
    for c, (one, grouped) in enumerate(zip(results[1], results[4], strict=True)):
        assert grouped.quality == one.quality
        np.testing.assert_allclose(grouped.losses, one.losses, rtol=1e-5)
        before = path_model.flatten(prepared[c][0]["params"])
        mask = path_model.flatten(prepared[c][2]["params"])
        after = path_model.flatten(grouped.state["params"])
        expected = path_model.flatten(one.state["params"])
        for path, value in after.items():
            if not np.asarray(mask[path]).any():  # locked
                np.testing.assert_array_equal(value, before[path])
            elif path[-2:-1] == ("experts",):
                np.testing.assert_allclose(value, expected[path], rtol=1e-4, atol=1e-6)
        # All of it through its predictions: a leaf whose exact gradient is zero (a key
        # bias) moves by Adam's normalized round-off, differently on each layout.
        logits = [
            child_lib.logits_of(steps, jax.device_get(t.state), validation())
            for t in (grouped, one)
        ]
        np.testing.assert_allclose(*logits, rtol=1e-4, atol=1e-5)
        group = set(devices[4 * c : 4 * (c + 1)])
        expert_leaves = [v for p, v in after.items() if p[-2:-1] == ("experts",)]
        moments = [
            leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(grouped.opt_state)[0]
            if (key := adam_moment_key(key_path)) and key[1][-2:-1] == ("experts",)
        ]
        assert len(expert_leaves) == 2 and len(moments) == 4  # w_in, w_out; mu, nu
        for leaf in expert_leaves + moments:
            assert leaf.sharding.device_set == group
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {8 // 4}
    # The layers ran their shard_map over the group: the compiled step exchanges tokens.
    mesh = parallel.make_mesh({"expert": 4}, devices[:4], axis_types=(jax.sharding.AxisType.Auto,))
    state, opt_state, mask, _ = prepared[0]
    placement = together.expert_shardings(mesh, state, opt_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        text = (
            steps.train_step.lower(
                jax.device_put(state, placement[0]),
                jax.device_put(opt_state, placement[1]),
                jax.device_put(batches[0][0], parallel.batch_sharding(mesh)),
                jax.device_put(mask, replicated),
            )
            .compile()
            .as_text()
        )
    assert "shard_map" in text and sum(hlo.collective_counts(text).values()) > 0


@pytest.mark.slow  # a generation of three children, then a second, on device groups
def test_generations_on_device_groups_compile_a_program_per_architecture_and_group():
    """devices_per_child=4 on 8 devices: two children at a time. A generation's record
    counts one compiled program per (architecture, group) it used first; a later
    generation of the same architectures compiles nothing new."""
    changes = {
        "model.moe_every": 2,
        "evolve.devices_per_child": 4,
        "evolve.children": 3,
        "evolve.steps": 4,
    }
    system = System(settings_from_config(tiny_config(**changes)))
    seen = set()
    for _ in range(2):
        record = system.run_generation("iris")
        shapes = [system.arch[c["path"]].shapes for c in record["children"]]
        used = {(a, group) for a in set(shapes) for group in range(min(shapes.count(a), 2))}
        assert record["compiles"] == len(used - seen)
        assert all(0 <= c["quality"] <= 1 for c in record["children"])
        seen |= used
    system.finish_task("iris")
    assert 0 < system.records["iris"]["test_accuracy_when_added"] <= 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"evolve.tasks": "iris, nope"}, "Unknown task 'nope'"),
        ({"evolve.size_scale": 1.5}, r"size scale s=1.5 must be in (0, 1]"),
        ({"evolve.size_scale": 0.0}, r"size scale s=0.0 must be in (0, 1]"),
        ({"evolve.mu": 1.5}, "mu=1.5 must be in [0, 1]"),
        ({"evolve.tasks": ""}, "tasks is empty"),
        ({"evolve.tasks": "iris, iris"}, "appear twice"),
        ({"evolve.learning_rate": 0.5}, "is not on its ladder"),
        ({"evolve.free_expert_slots": -1}, "free_expert_slots=-1 must be an int >= 0"),
        ({"evolve.free_expert_slots": 2}, "free_expert_slots=2 needs MoE blocks"),
        ({"evolve.devices_per_child": 16}, "devices_per_child=16 must be in [1, 8]"),
        ({"evolve.devices_per_child": 0}, "devices_per_child=0 must be an int >= 1"),
        ({"evolve.devices_per_child": 3}, "devices_per_child=3 does not divide the 8 devices"),
        (
            {"evolve.devices_per_child": 4, "batch_size": 18},
            "devices_per_child=4 does not divide batch_size=18",
        ),
        (
            {"evolve.devices_per_child": 8, "model.moe_every": 2},
            "does not divide moe.num_experts + free_expert_slots=4",
        ),
        (
            {"evolve.devices_per_child": 4, "model.moa_every": 2, "model.moa.num_experts": 6},
            "devices_per_child=4 does not divide moa.num_experts=6",
        ),
    ],
    ids=[
        "unknown task",
        "s above 1",
        "s zero",
        "mu",
        "no tasks",
        "twice",
        "ladder",
        "negative slots",
        "slots without MoE",
        "more devices per child than devices",
        "zero devices per child",
        "devices in uneven groups",
        "batch over a child's devices",
        "experts over a child's devices",
        "MoA experts over a child's devices",
    ],  # fmt: skip
)
def test_bad_input_one_line_nothing_written(changes, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, KeyError)) as caught:
        evolve(tiny_config(**changes), str(workdir))
    text = str(caught.value)
    assert message in text and "\n" not in text.strip()
    assert not workdir.exists()


def test_a_workdir_of_another_config_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(tiny_config().to_json_best_effort())
    before = sorted(os.listdir(workdir))
    with pytest.raises(
        ValueError, match=r"was made by a different config \(evolve.steps: 12 -> 13"
    ):
        evolve(tiny_config(**{"evolve.steps": 13}), str(workdir))
    assert sorted(os.listdir(workdir)) == before


def test_a_workdir_without_the_newer_fields_or_on_other_devices_is_the_same_config():
    """A workdir written before evolve.free_expert_slots and evolve.devices_per_child
    existed ran with 0 and 1; where children compute may change on a resume."""
    from multitask_moe.evolve import ADDED_FIELDS, PLACEMENT_FIELDS

    old = tiny_config()
    with old.unlocked():
        del old.evolve["free_expert_slots"], old.evolve["devices_per_child"]

    def changes(**now):
        return config_lib.changed_fields(
            old, tiny_config(**now), ignore=PLACEMENT_FIELDS, added=ADDED_FIELDS
        )

    assert changes() == changes(**{"evolve.devices_per_child": 2}) == []
    assert changes(**{"evolve.free_expert_slots": 2}) == ["evolve.free_expert_slots: 0 -> 2"]


def _command(workdir, *extra):
    args = [f"--config.{key}={value}" for key, value in TINY.items()]
    return [
        sys.executable,
        "-m",
        "multitask_moe.evolve",
        "--config=configs/evolve.py",
        f"--workdir={workdir}",
        *args,
        "--config.evolve.tasks=iris, wine, synthetic/a0",
        "--config.model.moe_every=2",  # the MoE block in the paths
        *extra,
    ]


@pytest.mark.slow  # three command-line runs of three tasks
def test_sigkill_mid_generation_resumes_to_the_same_system(tmp_path):
    straight = subprocess.run(
        _command(tmp_path / "straight"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    workdir = tmp_path / "killed"
    process = subprocess.Popen(
        _command(workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    # Kill once the second task is under way: its first generation is checkpointed.
    while process.poll() is None and time.monotonic() < deadline:
        summary = workdir / "evolution.json"
        if summary.exists() and len(json.loads(summary.read_text())["finished"]) >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(
        _command(workdir), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and "Resuming" in resumed.stdout, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "evolution.json").read_text())
    b = json.loads((workdir / "evolution.json").read_text())
    for record in (a, b):
        for task in record["per_task"].values():
            for generation in task["generations"]:
                generation.pop("seconds")
                generation.pop("compiles")  # a resumed process compiles again
    assert a == b
    # Immutability after three tasks: each task's accuracy now is the one when added.
    for task in b["per_task"].values():
        assert task["test_accuracy_now"] == task["test_accuracy_when_added"]
    assert (workdir / "system.png").exists()


def test_the_tpu_config_builds_its_system_and_traces_a_generation_of_eight_children():
    """configs/evolve.py:tpu: the larger root (d_model 256, 6 blocks, 8 experts) over the
    six tasks at 32 x 32 images, and one generation's 8 children stacked one per chip of
    an 8-chip host traced through their shared train step (shapes only: the root is built
    and a batch read, no step runs)."""
    import jax

    config = config_lib.sibling_config(os.path.join(REPO, "configs", "x.py"), "evolve", "tpu")
    settings = settings_from_config(config)
    settings.check()
    assert (settings.children, settings.generations, settings.steps) == (8, 8, 1000)
    system = System(settings)
    assert system.token_shape == (64, 16)  # (32 / 4)^2 patches of 4 x 4 grey digits
    root = system.paths[system.root]
    assert len(root.components) == 2 + 6 + 2  # stem, positions, 6 blocks, final norm, head
    assert 5e6 < system.root_params < 20e6, system.root_params
    child, trainable = system.mutate(system.root, settings.tasks[0])  # a first child
    state, opt_state, mask, batches = system._prepare(child, trainable)
    steps = system.steps_for(system.arch[child])

    def eight(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((8, *np.shape(x)), jax.numpy.result_type(x)), tree
        )

    batch = next(batches)
    assert batch["inputs"].shape == (settings.batch_size, 64, 16)
    _, _, loss = jax.eval_shape(
        steps.train_steps, eight(state), eight(opt_state), eight(batch), eight(mask)
    )
    assert loss.shape == (8,)
