"""Extracting one task's standalone model from a trained multitask model (docs/lifecycle.md).

    summary = extract("workdir/mod_squad", "digits/class", "models/digits_class")
    python -m multitask_moe.extract --workdir=W --task=NAME --out=O [--threshold=3]
        [--router=auto|sliced|full] [--usage=ema|data] [--export] [--overwrite]

Every MoE and MoA layer keeps the experts the task uses (selection.py); every
task-indexed table keeps the task's row; everything else (stems of other modalities,
other tasks' heads, routers and statistics) is dropped. The result is a directory laid
out like a training workdir (config.json, checkpoints/<step>/) plus extraction.json, so
`python -m multitask_moe.evaluate` and `lifecycle.restore` read it like any run:

- config.json: the source config with data.tasks = the task, the source's input layout
  (data.min_tokens / min_token_width), and model.layers giving each sparse layer its own
  expert count (`sliced` router) or its kept router columns (`full` router). Routing
  groups of one sequence (unless the source fixed a group size), a mesh over the data
  axis only, and experts replicated where a mesh's 'expert' axis does not divide a
  layer's count: the extracted model gives the same numbers on one device and any mesh.
- the checkpoint: the source's step; a fresh optimizer state (fine-tuning starts anew).
- extraction.json: task, router, usage source, kept experts per layer, parameter counts,
  validation/test accuracy of the full and the extracted model, and their agreement.

Nothing is written to O unless everything succeeds: the model is built in a sibling
temporary directory and renamed into place. While it is built, O.lock beside O names the
extraction writing it, and a second extraction into O stops at once (core/run_lock.py).
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from multitask_moe import models, parallel
from multitask_moe.core import build, config_lib, files
from multitask_moe.core import evaluate as evaluate_lib
from multitask_moe.core.checkpoint import Checkpoints
from multitask_moe.core.run_lock import claim
from multitask_moe.core.state import count_params, create_state
from multitask_moe.core.step import EVAL_KEYS, sum_trees
from multitask_moe.core.workdir import CONFIG_FILE, Restored, load_config, restore
from multitask_moe.errors import ConfigError
from multitask_moe.lifecycle import evaluation, selection
from multitask_moe.lifecycle.export import export_forward

EXTRACTION_FILE = "extraction.json"
ROUTERS = ("auto", "sliced", "full")
USAGES = ("ema", "data")


class ExtractionError(ConfigError):
    """An extraction that cannot be done; the message says why, nothing was written."""


def extract(
    workdir: str,
    task: str,
    out: str,
    *,
    threshold: float = 3.0,
    router: str = "auto",
    usage: str = "ema",
    export: bool = False,
    overwrite: bool = False,
    splits: tuple[str, ...] = ("validation", "test"),
    mesh: dict[str, int] | None = None,
) -> dict:
    """Extracts `task` from the latest checkpoint of `workdir` into the directory `out`.

    threshold: percent in (0, 100]; a layer keeps expert e when its share of the task's
      choices exceeds threshold / K percent (at least the K most used).
    router: "sliced" keeps the kept experts' router columns only (softmax over them, as
      Mod-Squad); "full" keeps the task's whole router and lets top-k choose among the
      kept experts (exact whenever the task never chose a dropped expert); "auto" =
      "full" for task routing (where it is exact) and "sliced" otherwise.
    usage: "ema" reads the usage statistics in the checkpoint; "data" counts the task's
      choices on its training examples.
    mesh: axis sizes to restore the trained model on instead of its config's (e.g.
      {"data": 1, "expert": 1}); the extracted model's own mesh is data-only either way.
    Returns the extraction.json contents. Raises ExtractionError (or WorkdirError,
    ConfigError) before writing anything.
    """
    _check_arguments(threshold, router, usage, out, overwrite)
    # Before the restore: a second extraction into `out` stops here, naming the first.
    with claim(os.path.dirname(os.path.abspath(out)), **_out_lock(out)):
        return _extract(
            workdir, task, out, threshold, router, usage, export, overwrite, splits, mesh
        )


def _out_lock(out: str) -> dict:
    """RunLock arguments of the lock beside `out` (its scratch copy is renamed onto it)."""
    name = os.path.basename(os.path.abspath(out))
    return {
        "file": f"{name}.lock",
        "holder": "extraction",
        "target": f"is writing {os.path.abspath(out)}",
        "flag": "--out",
    }


def _extract(workdir, task, out, threshold, router, usage, export, overwrite, splits, mesh):
    # Checks that need only the config come before the (slower) restore.
    config = load_config(workdir)
    if not (config.model.moe_every or config.model.moa_every):
        raise ExtractionError(
            f"the model in {workdir} has no MoE or MoA layer: there are no experts to extract"
        )
    trained = list(config_lib.parse_tasks(config.data.tasks)[0])
    if task not in trained:
        raise ExtractionError(f"task {task!r} is not one of the model's tasks; trained: {trained}")
    source = restore(workdir, config, mesh=mesh)
    _check_finite(source)
    experiment = source.experiment
    task_id = experiment.task_names.index(task)
    full_model = evaluation.evaluation_model(source)
    layers = full_model.sparse_layers()
    usage_rows = _usage_rows(source, full_model, task_id, usage)
    kept, routes, overrides = {}, {}, {}
    for name, layer in layers.items():
        by_task = layer.routing == "task"
        kept[name] = selection.kept_experts(
            usage_rows.get(name),
            layer.top_k,
            threshold,
            np.asarray(layer.router.task_logits[...])[task_id] if by_task else None,
        )
        layer_router = router if router != "auto" else ("full" if by_task else "sliced")
        overrides[name] = {"replicate_indivisible_experts": True}
        if layer_router == "sliced":
            overrides[name]["num_experts"] = len(kept[name])
            routes[name] = kept[name]
        else:
            overrides[name]["kept_experts"] = list(kept[name])

    config = _extracted_config(experiment, task, overrides)
    tmp = _scratch_directory(out)
    try:
        _write_config(tmp, config)
        target = restore_target(tmp, config, source, task_id, kept, routes)
        summary = {
            "task": task,
            "source": os.path.abspath(workdir) if "://" not in workdir else workdir,
            "step": source.step,
            "router": router,
            "usage": usage,
            "threshold": threshold,
            "kept_experts": {name: list(ids) for name, ids in kept.items()},
            "experts_full": {name: layer.num_experts for name, layer in layers.items()},
            "params_full": count_params(experiment.model.spec.abstract["params"]),
            "params_extracted": count_params(target.experiment.model.spec.abstract["params"]),
        }
        summary["params_ratio"] = summary["params_extracted"] / summary["params_full"]
        summary.update(_compare(source, target, task_id, splits))
        if export:
            export_forward(target, os.path.join(tmp, "export"))
        files.write_json(os.path.join(tmp, EXTRACTION_FILE), summary)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_finite(source: Restored) -> None:
    """ExtractionError naming the step and the first non-finite array of the source."""
    values = {"params": source.state["params"], "model_state": source.state["model_state"]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]:
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise ExtractionError(
                f"checkpoint step {source.step} in {source.directory} holds NaN or inf in "
                f"{jax.tree_util.keystr(path)}; nothing extracted (the checkpoint is left as "
                "it is: extract from a run whose latest checkpoint is finite)"
            )


def _check_arguments(threshold, router, usage, out, overwrite) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ExtractionError(f"threshold={threshold!r} must be a number in (0, 100]")
    if not 0 < threshold <= 100:
        raise ExtractionError(f"threshold={threshold} must be in (0, 100] (percent)")
    if router not in ROUTERS:
        raise ExtractionError(f"router={router!r} is not allowed; allowed: {ROUTERS}")
    if usage not in USAGES:
        raise ExtractionError(f"usage={usage!r} is not allowed; allowed: {USAGES}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        what = "a model" if os.path.exists(os.path.join(out, CONFIG_FILE)) else "other files"
        raise ExtractionError(f"{out} already holds {what}; pass --overwrite to replace it")


def _usage_rows(
    source: Restored, model: models.MultitaskTransformer, task_id: int, usage: str
) -> dict[str, np.ndarray]:
    """{layer: the task's usage row [E]} from the EMA or counted on its training examples."""
    experiment = source.experiment
    task = experiment.task_names[task_id]
    if usage == "data":
        sums = None
        sharding = parallel.batch_sharding(experiment.mesh)
        with jax.set_mesh(experiment.mesh):
            for _, batch in experiment.mixture.eval_batches(
                "train", batch_size=experiment.config.eval_batch_size, task_ids=[task_id]
            ):
                arrays = evaluate_lib.global_batch(batch, EVAL_KEYS, sharding)
                sums = sum_trees(sums, experiment.eval_step(source.state, arrays))
        sums = jax.device_get(sums)
        return {
            name: np.asarray(sums[f"{name}/task_chosen_counts"])[task_id]
            for name in model.sparse_layer_names()
        }
    rows = {name: np.asarray(table)[task_id] for name, table in model.usage_tables().items()}
    layers = model.sparse_layers()
    token_routed = [name for name, layer in layers.items() if layer.routing != "task"]
    missing = [name for name in token_routed if not rows.get(name, np.zeros(1)).any()]
    if missing:
        raise ExtractionError(
            f"the checkpoint has no usage statistics of task {task!r} in {missing} (trained "
            "without them, or the task was never sampled); use --usage=data to count them on "
            "its training examples"
        )
    return rows


def _extracted_config(experiment, task: str, overrides: dict) -> ml_collections.ConfigDict:
    config = experiment.config.copy_and_resolve_references()
    length, width = experiment.token_shape
    limit = config_lib.parse_tasks(config.data.tasks)[1].get(task)
    config.data.tasks = f"{task}=1" + (f"@{limit}" if limit else "")
    config.data.min_tokens, config.data.min_token_width = int(length), int(width)
    config.task_weights = ""
    config.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1})
    config.num_cpu_devices = 0  # the devices there are: one suffices (no simulated mesh)
    if config.model.moe_every and config.model.moe.group_size is None:
        # One sequence per routing group: never straddles devices on any mesh.
        config.model.moe.group_size = int(length)
    config.model.layers = ml_collections.ConfigDict(overrides)
    return config


def restore_target(
    directory: str,
    config: ml_collections.ConfigDict,
    source: Restored,
    task_id: int,
    kept: dict[str, tuple[int, ...]],
    routes: dict[str, tuple[int, ...]],
) -> Restored:
    """Builds the extracted model of `config`, fills it from `source` and checkpoints it
    in directory/checkpoints; returns it restored from there (what evaluate will see)."""
    experiment = build.experiment(build.resolve(config))
    spec = experiment.model.spec
    with jax.set_mesh(experiment.mesh):
        fresh = create_state(spec, config.seed)
    abstract_model = nnx.merge(spec.graphdef, fresh["params"], fresh["model_state"])
    tags = models.axis_tags(abstract_model)
    rows = models.RowMap(
        tasks=(task_id,),
        experts={models.SparseLayer.parse(name).state_path: ids for name, ids in kept.items()},
        routes={models.SparseLayer.parse(name).state_path: ids for name, ids in routes.items()},
    )
    source_values = jax.device_get(
        {"params": source.state["params"], "model_state": source.state["model_state"]}
    )
    state = dict(fresh, step=fresh["step"] + source.step)
    for part in ("params", "model_state"):
        tree = models.transplant_state(source_values[part], jax.device_get(fresh[part]), tags, rows)
        state[part] = jax.device_put(tree, spec.shardings[part])
    checkpoints = Checkpoints(
        os.path.join(directory, "checkpoints"), keep=config.keep_checkpoints, enable_async=False
    )
    try:
        progress = {
            "step": source.step,
            "task_names": list(experiment.task_names),
            "extracted_from": source.directory,
        }
        checkpoints.save(source.step, state, progress)
    finally:
        checkpoints.close()
    return restore(directory, config)


def _compare(source: Restored, target: Restored, task_id: int, splits) -> dict:
    """Accuracy of the full and the extracted model on the task, and their agreement."""
    out = {"accuracy_full": {}, "accuracy_extracted": {}, "agreement": {}}
    for split in splits:
        full_logits, labels = evaluation.task_logits(source, task_id, split)
        part_logits, part_labels = evaluation.task_logits(target, 0, split)
        if not np.array_equal(labels, part_labels):
            raise ExtractionError(f"the {split} examples of the two models differ in order")
        if not np.all(np.isfinite(part_logits)):
            raise ExtractionError(
                f"the extracted model gives NaN or inf logits on the {split} split; nothing written"
            )
        num_classes = target.experiment.task_num_classes[0]
        full = np.argmax(full_logits[:, :num_classes], -1)
        part = np.argmax(part_logits[:, :num_classes], -1)
        out["accuracy_full"][split] = float(np.mean(full == labels))
        out["accuracy_extracted"][split] = float(np.mean(part == labels))
        out["agreement"][split] = float(np.mean(full == part))
        out.setdefault("max_abs_logit_difference", {})[split] = float(
            np.max(np.abs(full_logits[:, :num_classes] - part_logits[:, :num_classes]))
        )
    return out


def _write_config(directory: str, config: ml_collections.ConfigDict) -> None:
    files.write_config(directory, config)


def _scratch_directory(out: str) -> str:
    out = os.path.abspath(out)
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _move_into_place(tmp: str, out: str, overwrite: bool) -> None:
    """Renames the finished directory to `out`; an old `out` goes only once the new one is
    complete (overwrite), so an interrupted extraction never leaves `out` half-made."""
    out = os.path.abspath(out)
    old = None
    if os.path.exists(out):
        if os.listdir(out) and not overwrite:
            raise ExtractionError(f"{out} already holds files; pass --overwrite to replace it")
        old = f"{out}.replaced-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    load_config(out)  # readable where it now lies
