"""The growing system: tasks added one after another by evolving paths over a component
pool (muNet / mu2Net, docs/methods.md section 3).

    system = System.create(settings)        # the root path: a fresh model, locked
    for task in settings.tasks:
        system.evolve_task(task)            # generations of children, then lock the best

For a task: each child samples a parent (sampling.py), mutates it (hyperparameters,
depth, an adapter, clone-or-reuse of every component, a new head for another task's
parent), trains with only its own unlocked components changing (child.py), and is scored
q * s ** (P / P_root) (paths.py). It joins the task's population if it scores at least
its parent, or always when the parent belongs to another task. At the end the best path's
components are locked and every other unlocked component is dropped. Locked components
never change, so the earlier tasks' predictions stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from multitask_moe import data
from multitask_moe.core.state import with_learning_rate
from multitask_moe.evolution import child as child_lib
from multitask_moe.evolution import offspring, path_model, pool_state, sampling, together
from multitask_moe.evolution.components import ComponentPool
from multitask_moe.evolution.paths import Path, accounted_params, score
from multitask_moe.evolution.settings import LADDERS, Settings
from multitask_moe.models.keys import flatten

logger = logging.getLogger(__name__)

ROOT_TASK = "root"


class System:
    """Components, paths, populations and history of one evolution run."""

    def __init__(self, settings: Settings):
        settings.check()
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.pool = ComponentPool()
        self.paths: dict[int, Path] = {}
        self.arch: dict[int, path_model.Architecture] = {}
        self.best: dict[str, int] = {}  # finished task -> its path
        self.records: dict[str, dict] = {}
        # How each live component came to its task's paths, relative to the earlier
        # tasks: "new" (fresh), "cloned" (a copy of an earlier task's or the root's
        # component, possibly through this task's children), "reused" is decided per path.
        self.lineage: dict[int, str] = {}
        self._steps: dict[path_model.Architecture, tuple] = {}
        # The train programs the generations needed, each compiled once (with its eval
        # program): one per (architecture, children stacked) with a device per child,
        # one per (architecture, device group) with several.
        self._programs: set[tuple] = set()
        mixture = data.Mixture(
            list(settings.tasks),
            image_size=settings.image_size,
            patch_size=settings.patch_size,
            data_dir=settings.data_dir,
        )
        self.token_shape = tuple(int(n) for n in mixture.token_shape)
        self.task_info = {task.name: (task.num_classes, task.modality) for task in mixture.tasks}
        self._mixtures: dict[str, data.Mixture] = {}
        self.progress = new_progress(0)
        self.root = self._make_root()
        self.root_params = accounted_params(self.paths[self.root].components, self.pool, ROOT_TASK)

    # -- building -------------------------------------------------------------------------

    def _make_root(self) -> int:
        """The root path: a fresh model of the config, owned by the pseudo-task 'root'."""
        first = self.settings.tasks[0]
        num_classes, modality = self.task_info[first]
        experts = int(self.settings.model.moe.num_experts)
        slots = experts + self.settings.free_expert_slots if self.settings.free_expert_slots else 0
        arch = path_model.Architecture(
            self.settings.model.depth, (), num_classes, modality, expert_slots=slots
        )
        _, fresh = self._fresh(arch)
        if slots:  # the root's experts fill the first slots of every MoE block
            moe_blocks = sorted(
                path[1]
                for path in flatten(fresh["model_state"])
                if path[-1] in path_model.ARCH_LEAVES
            )
            used = tuple(range(experts))
            arch = dataclasses.replace(arch, experts=tuple((i, used) for i in moe_blocks))
        parts = path_model.split(fresh, arch)
        ids = tuple(
            self.pool.add(
                name, parts[name].params, locks=[ROOT_TASK], statistics=parts[name].statistics
            )
            for name in arch.component_names()
        )
        hparams = {name: getattr(self.settings, name) for name in LADDERS}
        return self._add_path(ROOT_TASK, ids, hparams, arch, parent=None)

    def _add_path(self, task, components, hparams, arch, parent) -> int:
        path_id = len(self.paths)
        self.paths[path_id] = Path(path_id, task, tuple(components), hparams, parent)
        self.arch[path_id] = arch
        return path_id

    def _fresh(self, arch: path_model.Architecture):
        seed = int(self.rng.integers(2**31))
        return path_model.build(self.settings.model, arch, self.token_shape, seed)

    def steps_for(self, arch: path_model.Architecture) -> child_lib.ChildSteps:
        """The compiled steps of an architecture (built once, reused by every child)."""
        arch = arch.shapes
        if arch not in self._steps:
            graphdef, fresh = path_model.build(self.settings.model, arch, self.token_shape, 0)
            sparse = tuple(
                nnx.merge(graphdef, fresh["params"], fresh["model_state"]).sparse_layer_names()
            )
            steps = child_lib.ChildSteps.build(
                graphdef, sparse, self.settings.aux_weights, self.settings.weight_decay
            )
            self._steps[arch] = (steps, graphdef)
        return self._steps[arch][0]

    def named_components(self, path_id: int) -> dict[str, int]:
        """{component name: id} of a path, in model order."""
        names = self.arch[path_id].component_names()
        return dict(zip(names, self.paths[path_id].components, strict=True))

    def state_of(self, path_id: int) -> dict:
        """The path's model state assembled from its components."""
        arch = self.arch[path_id]
        _, fresh = path_model.build(self.settings.model, arch, self.token_shape, 0)
        return pool_state.assemble(self.pool, self.paths[path_id], arch, fresh)

    def mixture(self, task: str) -> data.Mixture:
        if task not in self._mixtures:
            self._mixtures[task] = data.Mixture(
                {task: 1.0},
                image_size=self.settings.image_size,
                patch_size=self.settings.patch_size,
                data_dir=self.settings.data_dir,
                min_token_shape=self.token_shape,
            )
        return self._mixtures[task]

    # -- one child ------------------------------------------------------------------------

    def mutate(self, parent_id: int, task: str) -> tuple[int, dict[str, bool]]:
        """A new child path of `parent_id` for `task`; returns (path id, {component:
        trainable}) (offspring.py)."""
        return offspring.make_child(self, parent_id, task)

    def _prepare(self, child_id: int, trainable: Mapping[str, bool]):
        """(state, opt_state, frozen mask, train batches) of a child about to train."""
        path, arch = self.paths[child_id], self.arch[child_id]
        steps = self.steps_for(arch)
        state = self.state_of(child_id)
        mask = child_lib.pure_mask(path_model.leaf_trainable(state, trainable, arch), state)
        opt_state = with_learning_rate(
            steps.tx.init(state["params"]), path.hparams["learning_rate"]
        )
        opt_state = pool_state.inherit_moments(self.pool, path, arch, state, opt_state)
        batches = self.mixture(path.task).iterator(
            "train", batch_size=self.settings.batch_size, seed=int(self.rng.integers(2**31))
        )
        return state, opt_state, mask, batches

    def _validation(self, task: str, split: str = "validation"):
        """A function giving a fresh pass over the task's `split` batches."""
        mixture, size = self.mixture(task), self.settings.eval_batch_size
        return lambda: (b for _, b in mixture.eval_batches(split, batch_size=size))

    def train_child(
        self, child_id: int, trainable: Mapping[str, bool], num_steps: int | None = None
    ) -> float:
        """Trains one child on the default device; stores its best point; returns q."""
        steps = self.steps_for(self.arch[child_id])
        state, opt_state, mask, batches = self._prepare(child_id, trainable)
        validation = self._validation(self.paths[child_id].task)
        result = child_lib.train(
            steps,
            state,
            opt_state,
            mask,
            batches,
            lambda state: child_lib.accuracy(steps, state, validation()),
            num_steps=num_steps or self.settings.steps,
            validations=self.settings.validations,
        )
        pool_state.store(self.pool, self.paths[child_id], self.arch[child_id], result)
        _warn_if_diverged(self.paths[child_id].task, child_id, result.diverged_at, result.quality)
        return result.quality

    def train_children(
        self, children: list[tuple[int, Mapping[str, bool]]]
    ) -> list[tuple[float, int | None]]:
        """Trains a generation's children: those of one architecture together, one per
        device or per group of `devices_per_child` devices (together.train); returns
        (quality, step its loss turned non-finite or None) of each, in order."""
        groups: dict[path_model.Architecture, list[int]] = {}
        for index, (child_id, _) in enumerate(children):
            # Active expert slots are state: children that differ only there stack.
            groups.setdefault(self.arch[child_id].shapes, []).append(index)
        per_child = self.settings.devices_per_child
        at_once = len(jax.devices()) // per_child
        prepared = [self._prepare(child_id, trainable) for child_id, trainable in children]
        outcomes: list[tuple[float, int | None]] = [(0.0, None)] * len(children)
        for arch, members in groups.items():
            steps = self.steps_for(arch)
            for start in range(0, len(members), at_once):
                chunk = members[start : start + at_once]
                self._programs.update(
                    (arch, *program) for program in together.programs(len(chunk), per_child)
                )
                results = together.train(
                    steps,
                    *([prepared[i][k] for i in chunk] for k in range(4)),
                    self._validation(self.paths[children[chunk[0]][0]].task),
                    num_steps=self.settings.steps,
                    validations=self.settings.validations,
                    devices_per_child=per_child,
                )
                for index, result in zip(chunk, results, strict=True):
                    child_id = children[index][0]
                    pool_state.store(self.pool, self.paths[child_id], self.arch[child_id], result)
                    outcomes[index] = (result.quality, result.diverged_at)
        return outcomes

    # -- tasks and generations ------------------------------------------------------------

    def run(self, on_step=None) -> None:
        """Introduces every remaining task; on_step(system) after each generation and each
        finished task (where the caller checkpoints: a resumed system goes on from there)."""
        tasks = self.settings.tasks
        while self.progress["task_index"] < len(tasks):
            task = tasks[self.progress["task_index"]]
            while self.progress["generation"] < self.settings.generations:
                self.run_generation(task)
                if on_step is not None:
                    on_step(self)
            self.finish_task(task)
            if on_step is not None:
                on_step(self)

    def evolve_task(self, task: str) -> dict:
        """Every generation of the current task, then its end; returns its record."""
        expected = self.settings.tasks[self.progress["task_index"]]
        if task != expected:
            raise ValueError(f"task {task!r} is not next; the next task is {expected!r}")
        while self.progress["generation"] < self.settings.generations:
            self.run_generation(task)
        return self.finish_task(task)

    def run_generation(self, task: str) -> dict:
        """One generation of children for `task` (the current task)."""
        settings, progress = self.settings, self.progress
        seeds = [self.paths[self.best[t]] for t in self.best] + [self.paths[self.root]]
        population = [self.paths[i] for i in progress["population"]]
        start = time.perf_counter()
        compiled_before = len(self._programs)
        # Parents are drawn from the population as it stood when the generation began;
        # then the children train together (mu2Net).
        planned = []
        for _ in range(settings.children):
            parent = sampling.sample_parent(self.rng, population, seeds)
            parent.children += 1
            child_id, trainable = self.mutate(parent.id, task)
            planned.append((parent, child_id, trainable))
        outcomes = self.train_children([(child_id, tr) for _, child_id, tr in planned])
        children = []
        for (parent, child_id, _), (quality, diverged_at) in zip(planned, outcomes, strict=True):
            child = self.paths[child_id]
            child.quality = quality
            where = f"{task}, generation {progress['generation']}"
            _warn_if_diverged(where, child_id, diverged_at, quality)
            params = accounted_params(child.components, self.pool, task)
            child.score = score(child.quality, params, self.root_params, settings.size_scale)
            accepted = parent.task != task or child.score >= (parent.score or 0.0)
            if accepted:
                population.append(child)
            else:
                self.pool.drop(child.components)
            children.append(
                {
                    "path": child_id,
                    "parent": parent.id,
                    "quality": child.quality,
                    "score": child.score,
                    "accounted_params": params,
                    "accepted": accepted,
                    "diverged_at_step": diverged_at,
                }
            )
        record = {
            "generation": progress["generation"],
            "children": children,
            "compiles": len(self._programs) - compiled_before,
            "seconds": time.perf_counter() - start,
        }
        progress["population"] = [p.id for p in population]
        progress["generations"].append(record)
        progress["generation"] += 1
        return record

    def finish_task(self, task: str) -> dict:
        """Keeps the best path of `task`, locks its components, drops the rest."""
        population = [self.paths[i] for i in self.progress["population"]]
        best = max(population, key=lambda p: (p.score, -p.id))
        self.pool.lock(best.components, task)
        for path in population:
            if path.id != best.id:
                self.pool.drop(path.components)
        self.best[task] = best.id
        record = self._task_record(task, best, self.progress["generations"])
        self.records[task] = record
        for earlier in self.best:
            self.records[earlier]["test_accuracy_now"] = self.test_accuracy(earlier)
        self.progress = new_progress(self.progress["task_index"] + 1)
        return record

    def finetune(self, task: str) -> dict:
        """The baseline muNet compares with: the root fine-tuned as a full copy for `task`
        (every component cloned, a new head), trained as long as a path can be over the
        task's generations; its components are dropped afterwards."""
        root_arch = self.arch[self.root]
        num_classes, modality = self.task_info[task]
        arch = dataclasses.replace(root_arch, num_classes=num_classes, modality=modality)
        fresh = path_model.split(self._fresh(arch)[1], arch)
        root = self.named_components(self.root)
        components = []
        for name in arch.component_names():
            if name == "head" or (name == "stem" and modality != root_arch.modality):
                cid = self.pool.add(name, fresh[name].params, statistics=fresh[name].statistics)
            else:
                cid = self.pool.clone(root[name])
            components.append(cid)
        path_id = self._add_path(task, components, dict(self.paths[self.root].hparams), arch, None)
        trainable = dict.fromkeys(arch.component_names(), True)
        quality = self.train_child(
            path_id, trainable, self.settings.steps * self.settings.generations
        )
        result = {
            "quality": quality,
            "test_accuracy": self.test_accuracy(task, path_id),
            "params": float(sum(self.pool[c].size for c in components)),
        }
        self.pool.drop(components)
        return result

    def _task_record(self, task: str, best: Path, generations: list) -> dict:
        names = self.arch[best.id].component_names()
        kinds = {}
        for name, cid in zip(names, best.components, strict=True):
            reused = self.pool[cid].locks - {task}
            kinds[name] = "reused" if reused else self.lineage.get(cid, "new")
        return {
            "task": task,
            "path": best.id,
            "components": {
                name: {"id": cid, "kind": kinds[name], "size": self.pool[cid].size}
                for name, cid in zip(names, best.components, strict=True)
            },
            "architecture": dataclasses.asdict(self.arch[best.id]),
            "hparams": dict(best.hparams),
            "quality": best.quality,
            "score": best.score,
            "accounted_params": accounted_params(best.components, self.pool, task),
            "test_accuracy_when_added": self.test_accuracy(task, best.id),
            "generations": generations,
        }

    def test_accuracy(self, task: str, path_id: int | None = None) -> float:
        path_id = self.best[task] if path_id is None else path_id
        steps = self.steps_for(self.arch[path_id])
        test = self._validation(task, "test")()
        return child_lib.accuracy(steps, self.state_of(path_id), test)

    def test_logits(self, task: str) -> np.ndarray:
        path_id = self.best[task]
        steps = self.steps_for(self.arch[path_id])
        test = self._validation(task, "test")()
        return child_lib.logits_of(steps, self.state_of(path_id), test)


def _warn_if_diverged(where: str, path_id: int, step: int | None, quality: float) -> None:
    if step is not None:
        logger.warning(
            "task %s: the loss or parameters of path %d are not finite from step %d on; it "
            "keeps its best point before that (quality %.3f)", where, path_id, step, quality,
        )  # fmt: skip


def new_progress(task_index: int) -> dict:
    """Where the run stands: the task being introduced, its next generation, its
    population (path ids) and the records of its finished generations."""
    return {"task_index": task_index, "generation": 0, "population": [], "generations": []}
