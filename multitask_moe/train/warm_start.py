"""Starting a run from another run's model with a different task list (config.init_from).

    config.init_from = "workdir/seen"            # its latest checkpoint
    config.new_task_init = "nearest"             # or "scratch", "<seen task>", or per task
    config.freeze = "shared"                     # or "none", "experts"

`plan(config, ...)` (called by setup.prepare, before anything is written) reads the source
run, checks that its model is this config's model up to the task list, pins the input
layout to the source's, and decides which tasks are new and how each is initialized.
`initial_state(...)` (called by the loop when the workdir has no checkpoint of its own)
restores the source, picks the nearest seen task where asked (nearest.py), and fills a
fresh state through models.surgery: seen tasks keep their rows (matched by name, in
any order), a new task takes the rows of the task it starts from, or keeps its fresh
rows (`scratch`); its head and its statistics always start fresh. The optimizer state is
new (moments zero, the learning-rate schedule from its warm-up): the source's moments
belong to another mixture's gradients. docs/lifecycle.md has the whole story.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from flax import nnx, traverse_util

from multitask_moe import models, parallel
from multitask_moe.core import build, config_lib, files
from multitask_moe.core import evaluate as evaluate_lib
from multitask_moe.core.checkpoint import Checkpoints
from multitask_moe.core.state import StateSpec, create_state
from multitask_moe.core.step import EVAL_KEYS
from multitask_moe.train import nearest

WARM_START_FILE = "warm_start.json"
INIT_RULES = ("scratch", "nearest")


class WarmStartError(ValueError):
    """init_from, new_task_init or freeze cannot be honoured; the message says why."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a warm start does, decided from the configs alone.

    directory: the source workdir; step: its latest checkpoint; config: its config.
    seen_tasks: the source's tasks (data.Task) in its order. new_tasks: ids (in the new
    run's task order) of the tasks the source does not have. inits: {new task name:
    "scratch" | "nearest" | a seen task name}. token_shape: the source's input layout
    (pinned).
    """

    directory: str
    step: int
    config: ml_collections.ConfigDict
    seen_tasks: tuple
    new_tasks: tuple[int, ...]
    inits: Mapping[str, str]
    token_shape: tuple[int, int]

    @property
    def seen_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.seen_tasks)


@dataclasses.dataclass(frozen=True)
class Source:
    """A prepared warm start: its plan and the source model's abstract state on this
    run's mesh (what its checkpoint restores onto)."""

    plan: Plan
    spec: StateSpec


def read_source(directory: str) -> tuple[ml_collections.ConfigDict, int]:
    """(config, latest step) of the run in `directory`; WarmStartError when there is none."""
    config = config_lib.read_config(directory)
    if config is None:
        raise WarmStartError(
            f"init_from={directory!r} has no {config_lib.CONFIG_FILE}: not a training run"
        )
    checkpoint_dir = os.path.join(directory, "checkpoints")
    step = None
    if tf.io.gfile.isdir(checkpoint_dir):
        checkpoints = Checkpoints(checkpoint_dir, keep=1, enable_async=False)
        try:
            step = checkpoints.latest_step()
        finally:
            checkpoints.close()
    if step is None:
        raise WarmStartError(f"init_from={directory!r} holds no checkpoint")
    return config, step


def model_differences(
    source: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> list[str]:
    """The config fields that make the two models differ in more than their tasks."""

    def fields(c):
        flat = traverse_util.flatten_dict(c.model.to_dict(), sep=".")
        flat = {f"model.{k}": v for k, v in flat.items()}
        for key in ("image_size", "patch_size"):
            flat[f"data.{key}"] = c.data[key]
        return flat

    before, after = fields(source), fields(config)
    return sorted(
        key
        for key in set(before) | set(after)
        if _comparable(before.get(key)) != _comparable(after.get(key))
    )


def _comparable(value):
    return list(value) if isinstance(value, tuple | list) else value


def parse_inits(text: str, new_tasks: Sequence[str], seen_tasks: Sequence[str]) -> dict[str, str]:
    """new_task_init -> {new task: "scratch" | "nearest" | seen task}.

    "nearest" (every new task), "digits/class" (every new task from that seen task), or
    "digits/parity=nearest, iris=scratch" (per task; a new task not named: scratch).
    """
    text = text.strip() or "scratch"
    if "=" in text:
        rules = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, rule = (s.strip() for s in item.rpartition("="))
            if not sep or not name:
                raise WarmStartError(
                    f"new_task_init: {item!r} is not task=rule (rule: scratch, nearest or a "
                    "seen task)"
                )
            if name not in new_tasks:
                raise WarmStartError(
                    f"new_task_init names {name!r}, which is not a new task; new tasks: "
                    f"{list(new_tasks)}"
                )
            rules[name] = rule
    else:
        rules = dict.fromkeys(new_tasks, text)
    for name, rule in rules.items():
        if rule not in INIT_RULES and rule not in seen_tasks:
            raise WarmStartError(
                f"new_task_init={text!r}: {rule!r} (for {name}) is not scratch, nearest or a "
                f"seen task; seen tasks: {list(seen_tasks)}"
            )
    return {name: rules.get(name, "scratch") for name in new_tasks}


def plan(config: ml_collections.ConfigDict, task_names: Sequence[str]) -> Plan | None:
    """The warm start of `config` (None without init_from); WarmStartError for a source
    that cannot start this run."""
    if not config.init_from:
        if config.freeze != "none":
            raise WarmStartError(
                f"freeze={config.freeze!r} needs init_from: only a warm-started run has "
                "parameters to keep"
            )
        if config.new_task_init not in ("", "scratch"):
            raise WarmStartError(
                f"new_task_init={config.new_task_init!r} needs init_from (a run to take seen "
                "tasks from)"
            )
        return None
    source, step = read_source(config.init_from)
    differing = model_differences(source, config)
    if differing:
        raise WarmStartError(
            f"init_from={config.init_from!r}: the model differs in more than its tasks: "
            + ", ".join(
                f"{key} ({_field(source, key)!r} -> {_field(config, key)!r})" for key in differing
            )
        )
    mixture = build.mixture(source)  # its tasks in its order, its input layout
    seen = tuple(task.name for task in mixture.tasks)
    new_ids = tuple(i for i, name in enumerate(task_names) if name not in seen)
    new_names = [task_names[i] for i in new_ids]
    if config.freeze == "shared" and not new_ids:
        raise WarmStartError(
            f"freeze='shared' with no new task: every task of data.tasks is already in "
            f"{config.init_from!r}, so nothing would train"
        )
    inits = parse_inits(config.new_task_init, new_names, seen)
    return Plan(
        directory=config.init_from,
        step=step,
        config=source,
        seen_tasks=tuple(mixture.tasks),
        new_tasks=new_ids,
        inits=inits,
        token_shape=tuple(int(n) for n in mixture.token_shape),
    )


def _field(config, dotted: str):
    node = config
    for key in dotted.split("."):
        if key not in node:
            return None
        node = node[key]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def row_map(
    plan: Plan, task_names: Sequence[str], starts: Mapping[str, str | None]
) -> tuple[models.RowMap, models.RowMap]:
    """(parameter rows, statistic rows): seen tasks read their own source row; a new
    task reads the row of the seen task it starts from (`starts`, None: fresh), except its
    head (class axis), and its statistics always start fresh."""
    source_id = {name: i for i, name in enumerate(plan.seen_names)}
    params, stats = [], []
    for name in task_names:
        if name in source_id:
            params.append(source_id[name])
            stats.append(source_id[name])
        else:
            start = starts.get(name)
            params.append(None if start is None else source_id[start])
            stats.append(None)
    seen_only = tuple(source_id.get(name) for name in task_names)
    return (
        models.RowMap(tasks=tuple(params), class_tasks=seen_only),
        models.RowMap(tasks=tuple(stats)),
    )


def fill_state(fresh: dict, source: dict, tags, maps: tuple[models.RowMap, models.RowMap]):
    """The fresh state with params and model_state transplanted from the source state
    (both host values); step and optimizer state stay fresh."""
    state = dict(fresh)
    for part, rows in zip(("params", "model_state"), maps, strict=True):
        state[part] = models.transplant_state(source[part], fresh[part], tags, rows)
    return state


def write_record(workdir: str, record: dict) -> None:
    files.write_json(os.path.join(workdir, WARM_START_FILE), record)


def new_leaf_paths(target_params, source_params) -> list[tuple]:
    """Paths of target parameters the source has no leaf for (e.g. a new modality's stem)."""
    source = set(traverse_util.flatten_dict(nnx.to_pure_dict(source_params)))
    return [
        path
        for path in traverse_util.flatten_dict(nnx.to_pure_dict(target_params))
        if path not in source
    ]


def initial_state(experiment, workdir: str) -> dict:
    """The first state of a warm-started run (the workdir has no checkpoint of its own):
    the source restored, new tasks' starting rows chosen, everything transplanted. Writes
    workdir/warm_start.json with the choices (and every candidate's score for `nearest`)."""
    source, config = experiment.warm_start, experiment.config
    plan, spec, task_names = source.plan, experiment.model.spec, experiment.task_names
    checkpoints = Checkpoints(
        os.path.join(plan.directory, "checkpoints"), keep=1, enable_async=False
    )
    try:
        restored, _ = checkpoints.restore(plan.step, source.spec.abstract)
    finally:
        checkpoints.close()
    source_values = jax.device_get({part: restored[part] for part in ("params", "model_state")})
    del restored
    fresh = jax.device_get(create_state(spec, config.seed))
    tags = {
        **models.axis_tags(spec.abstract["params"]),
        **models.axis_tags(spec.abstract["model_state"]),
    }
    starts = {
        name: (rule if rule in plan.seen_names else None) for name, rule in plan.inits.items()
    }
    record = {
        "init_from": plan.directory,
        "step": plan.step,
        "seen_tasks": [name for name in task_names if name in plan.seen_names],
        "new_tasks": {},
    }
    wanted = [name for name, rule in plan.inits.items() if rule == "nearest"]
    all_scores = {}
    if wanted:
        state = fill_state(fresh, source_values, tags, row_map(plan, task_names, starts))
        state = jax.device_put(state, spec.shardings)
        all_scores = _nearest_scores(experiment, state, wanted)
        for name in wanted:
            starts[name] = nearest.nearest(all_scores[name])
    for name, rule in plan.inits.items():
        record["new_tasks"][name] = {
            "rule": rule,
            "start": starts[name] or "scratch",
            **({"scores": all_scores[name]} if name in all_scores else {}),
        }
    state = fill_state(fresh, source_values, tags, row_map(plan, task_names, starts))
    state = jax.device_put(state, spec.shardings)
    if jax.process_index() == 0:
        print(describe(plan, task_names, starts), flush=True)
        for name in wanted:
            print(f"  nearest for {name}: {summary_scores(all_scores[name])}", flush=True)
        if experiment.model.trainable is not None:
            share = models.frozen_fraction(
                spec.abstract["params"], experiment.model.trainable["params"]
            )
            print(f"  freeze={config.freeze}: {share:.1%} of the parameters frozen", flush=True)
        write_record(workdir, record)
    return state


def _nearest_scores(experiment, state: dict, wanted: Sequence[str]) -> dict[str, dict]:
    """{new task: {seen task: probe score}} with the seen tasks' rows already in `state`."""
    config, task_names = experiment.config, experiment.task_names
    plan = experiment.warm_start.plan
    candidates = [i for i, name in enumerate(task_names) if name in plan.seen_names]
    forward = nearest.predictions_fn(experiment.model.spec.graphdef, experiment.mesh)
    sharding = parallel.batch_sharding(experiment.mesh)
    out = {}
    for name in wanted:
        task_id = task_names.index(name)
        batches, count = [], 0
        for _, batch in experiment.mixture.eval_batches(
            "train", batch_size=config.eval_batch_size, task_ids=[task_id]
        ):
            batches.append(evaluate_lib.global_batch(batch, EVAL_KEYS, sharding))
            count += int(np.sum(batch["valid"])) * jax.process_count()
            if count >= config.nearest_examples:
                break
        features, labels = nearest.candidate_predictions(
            forward, state, batches, candidates, config.nearest_examples
        )
        out[name] = nearest.scores(
            features, labels, experiment.task_num_classes[task_id], task_names
        )
    return out


def trainable(spec: StateSpec, source_spec: StateSpec, plan: Plan, mode: str) -> dict:
    """{"params", "model_state"}: the masks of what trains under freeze=`mode`; leaves
    the source model lacks (a new modality's stem) serve only new tasks and train."""
    out = {}
    for part in ("params", "model_state"):
        tree = spec.abstract[part]
        out[part] = models.trainable_mask(
            tree,
            models.axis_tags(tree),
            mode,
            new_tasks=plan.new_tasks,
            new_paths=new_leaf_paths(tree, source_spec.abstract[part]),
            statistics=part == "model_state",
        )
    return out


def task_groups(experiment) -> dict[str, list[str]] | None:
    """{"seen": [...], "new": [...]} of a warm-started run, for tables and metrics."""
    if experiment.warm_start is None:
        return None
    new = {experiment.task_names[i] for i in experiment.warm_start.plan.new_tasks}
    return {
        "seen": [name for name in experiment.task_names if name not in new],
        "new": [name for name in experiment.task_names if name in new],
    }


def describe(plan: Plan, task_names: Sequence[str], chosen: Mapping[str, str | None]) -> str:
    new = [task_names[i] for i in plan.new_tasks]
    parts = [f"{name} from {chosen[name] or 'scratch'}" for name in new]
    return (
        f"Warm start from {plan.directory} (step {plan.step}): "
        f"{len(task_names) - len(new)} seen tasks keep their rows; new: "
        + (", ".join(parts) if parts else "none")
    )


def summary_scores(scores: Mapping[str, Mapping[str, float]]) -> str:
    ordered = sorted(scores.items(), key=lambda item: item[1]["loss"])
    return ", ".join(f"{name} {value['loss']:.3f}" for name, value in ordered)
