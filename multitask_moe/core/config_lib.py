"""The config schema every configs/*.py starts from, and the `:arg` parser.

Configs are Python files whose `get_config(arg)` returns an ml_collections.ConfigDict
(big_vision style). They start from `base_config()`, so every field exists in every config
and `--config.<key>=value` overrides work the same way everywhere; an unknown key is an
error, never a silently ignored setting.

Fields that may be None (dropless capacity, no group size, default data_dir) are
placeholders: set them to None in a config file or through its `:arg`; the command line
can give them a value but cannot parse "None".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing
from collections.abc import Iterable, Mapping

import ml_collections
from ml_collections import config_dict

from multitask_moe.moe import MoASettings, MoESettings

CONFIG_FILE = "config.json"  # what a run writes to its workdir


def settings_section(settings: type, **values) -> ml_collections.ConfigDict:
    """A config section with one field per field of a layer's settings dataclass: the
    field's default, or `values[name]` (required fields must be given).

    A field that may be None is a typed placeholder, so the command line can still set it;
    a field of several types (eval_capacity_factor: a float, None or "same") takes any value.
    """
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(settings):
        value = values.pop(field.name, field.default)
        if value is dataclasses.MISSING:
            raise ValueError(f"{settings.__name__}.{field.name} needs a value in the config")
        kinds = [kind for kind in typing.get_args(field.type) if kind is not type(None)]
        if len(kinds) > 1:
            section[field.name] = config_dict.FieldReference(value, field_type=object)
        elif kinds:  # T | None
            reference = config_dict.placeholder(typing.get_origin(kinds[0]) or kinds[0])
            reference.set(value)
            section[field.name] = reference
        else:
            section[field.name] = value
    if values:
        raise ValueError(f"{settings.__name__} has no fields {sorted(values)}")
    return section


def base_config() -> ml_collections.ConfigDict:
    """Every field a training config has, with neutral defaults."""
    c = ml_collections.ConfigDict()
    # How docs/config.md reads this function (tools/config_reference.py): a comment block
    # describes every field below it up to the next blank line or comment block; an
    # inline comment describes its own line.

    c.seed = 0  # parameters, dropout, example order and @N subsets

    # Runtime, applied by `python -m multitask_moe.train` before JAX starts.
    c.platform = ""  # jax_platforms, e.g. "cpu"; "" lets JAX choose (TPU / GPU / CPU).
    c.num_cpu_devices = 0  # > 0: simulate this many CPU devices (jax_num_cpu_devices).
    c.distributed = "auto"  # parallel.initialize mode: auto | none | tpu | slurm | explicit.

    # Mesh axis sizes (multitask_moe.parallel.make_mesh; -1 = the remaining devices).
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1})

    c.data = ml_collections.ConfigDict()
    # "name=weight, name=weight@N": the mixture (data.Mixture); @N trains on N examples of
    # the task's train split, the same ones for the same seed.
    c.data.tasks = ""

    c.data.rate = "explicit"  # sampling rates: explicit | proportional | temperature
    c.data.temperature = config_dict.placeholder(float)  # rate="temperature" only
    c.data.cap = config_dict.placeholder(float)  # cap on scaled example counts (not explicit)
    c.data.image_size = 8  # images are resized to image_size x image_size
    c.data.patch_size = 2  # one token per patch_size x patch_size patch
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: the package default
    # Pad examples to at least this many tokens / features per token (0: the tasks' own);
    # an extracted model keeps the input layout of the mixture it was trained in.
    c.data.min_tokens = 0
    c.data.min_token_width = 0

    # Example order: "process" (each process shuffles its own shard; any dataset size) or
    # "global" (one order for any process count: every process holds every training split
    # in memory; a run resumed on another number of processes sees the same batches).
    c.data.order = "process"

    c.data.eval_split = "validation"  # periodic and final evaluation
    c.data.test_split = "test"  # evaluated once at the end; "" = skip

    c.task_weights = ""  # "name=weight" loss weights; unnamed tasks weigh 1.
    # "fixed": the mean over the batch's tasks of task_weight * loss; "uncertainty": each
    # task's loss scaled by a learned 0.5 / s_t^2, plus log(1 + s_t^2) (docs/methods.md).
    c.task_weighting = "fixed"

    # Warm start (docs/lifecycle.md, "Adding tasks"): start from the latest checkpoint of
    # another run, whose model may have other tasks; seen tasks keep their rows by name.
    c.init_from = ""  # a training workdir; "" = a fresh initialization
    # How a new task starts: "scratch" | "nearest" (the seen task whose rows serve its
    # training examples best) | "<seen task>", or per task: "digits/parity=nearest, iris=scratch".
    c.new_task_init = "scratch"

    c.nearest_examples = 256  # training examples of a new task that score the candidates
    # "none" | "experts" (expert weights fixed) | "shared" (only the new tasks' rows train).
    c.freeze = "none"

    c.batch_size = 64  # global, over all processes and devices
    c.eval_batch_size = 128  # global evaluation batch
    c.num_train_steps = 1000  # optimizer steps
    c.log_every_steps = 50  # train metrics to metrics.jsonl and TensorBoard
    c.eval_every_steps = 500  # 0 = only at the end
    c.checkpoint_every_steps = 500  # 0 = only at the end (and on SIGTERM)
    c.keep_checkpoints = 3  # the newest checkpoints kept
    # A non-finite loss or gradient norm stops the run (False) or skips that update (True).
    c.skip_nonfinite_updates = False

    # AdamW with linear warm-up and cosine decay.
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3  # peak, after warm-up
    c.optimizer.warmup_steps = 100  # linear from 0
    c.optimizer.end_learning_rate_factor = 0.01  # cosine decays to lr * this
    c.optimizer.b1 = 0.9  # Adam's first-moment decay
    c.optimizer.b2 = 0.999  # Adam's second-moment decay
    c.optimizer.weight_decay = 1e-4  # on matrices only, not on biases, norms, embeddings
    c.optimizer.grad_clip_norm = 1.0  # 0 = no clipping

    # Weights of the aux losses, summed over every MoE / MoA layer (docs/methods.md).
    c.aux_loss = ml_collections.ConfigDict()
    c.aux_loss.load_balance = 0.01  # Switch load balance
    c.aux_loss.router_z = 0.001  # router z-loss
    c.aux_loss.mutual_info = 0.0  # Mod-Squad's task-expert mutual information (maximized)

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64  # width of tokens
    c.model.depth = 4  # transformer blocks
    c.model.num_heads = 4  # attention heads of dense attention
    c.model.mlp_dim = 128  # dense MLP hidden size
    c.model.dtype = "float32"  # activations: float32 | bfloat16
    c.model.param_dtype = "float32"  # parameters: float32 | bfloat16
    c.model.moe_every = 2  # MoE MLP in blocks i % moe_every == moe_every - 1; 0 = none
    c.model.moa_every = 0  # MoA attention in blocks i % moa_every == 0; 0 = none
    # Every option of the sparse layers, named and defaulted as in the layers' constructors
    # (multitask_moe.MoE / MoA; the settings classes beside them). d_hidden=0 means
    # mlp_dim // top_k (the active compute of one dense MLP); group_size=None means one
    # routing group per device's share of a batch (core/build.py routing_group_size).
    c.model.moe = settings_section(MoESettings, num_experts=8, top_k=2, d_hidden=0)
    c.model.moa = settings_section(MoASettings, num_experts=8, top_k=2, head_dim=16)
    # Settings of single sparse layers over the two sections above, by layer name, e.g.
    # {"block1/moe": {"num_experts": 3}}: what an extracted model writes (extract.py).
    c.model.layers = ml_collections.ConfigDict()
    # Residual adapters after blocks, {"<block index>": size} (an evolved path's model).
    c.model.adapters = ml_collections.ConfigDict()

    # > 0: a jax.profiler trace of this many steps, after 3 warm-up steps, written to
    # workdir/tensorboard (TensorBoard's profile plugin shows it beside the metrics).
    c.profile_steps = 0

    c.progress_bar = True  # a tqdm bar on the console (process 0)
    c.write_plots = True  # learning curves and routing heatmaps at the end
    return c


def parse_arg(arg: str | None, **defaults):
    """Parses a config's `:arg` string, "k=v,k2=v2" (or "flag" for flag=True).

    Each value takes the type of its default. Unknown keys raise ValueError listing the
    known ones.
    """
    values = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            text = "True"
        values[key] = _typed(key, text, default)
    return ml_collections.ConfigDict(values)


def _typed(key: str, text: str, default):
    """`text` as a value of `default`'s type (bools as true/false/1/0)."""
    if isinstance(default, bool):
        if text.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config arg {key}={text!r} must be true or false")
        return text.strip().lower() in ("true", "1")
    return type(default)(text.strip())


def read_config(directory: str) -> ml_collections.ConfigDict | None:
    """The config a run (or an extraction) wrote to directory/config.json; None if none."""
    import tensorflow as tf  # for gs:// paths; here, since config files import this module

    path = os.path.join(directory, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        saved = json.load(f)
    # A config written before a field existed reads as if it had the field's default, so
    # workdirs of earlier versions still restore, evaluate and resume.
    return ml_collections.ConfigDict(_with_defaults(base_config().to_dict(), saved))


def _with_defaults(defaults: dict, saved: dict) -> dict:
    """`saved` with every key of `defaults` it lacks (recursively); saved values win."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict) and value:
            out[key] = _with_defaults(value, out[key])
    return out


def set_fields(config: ml_collections.ConfigDict, changes: Mapping[str, object]):
    """Sets dotted fields ("model.moe.top_k": 1, ...) of `config` in place; returns it."""
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def set_from_strings(config: ml_collections.ConfigDict, items: Iterable[str]):
    """Sets "dotted.key=value" strings (a script's --set flags), each value cast to the
    type of the field it replaces; returns `config`."""
    for item in items:
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = _typed(key, value, node[leaf])
    return config


def changed_fields(
    before: ml_collections.ConfigDict,
    after: ml_collections.ConfigDict,
    *,
    ignore: tuple[str, ...] = (),
    added: Mapping[str, object] | None = None,
) -> list[str]:
    """["key: old -> new", ...] for every field (dotted) whose value differs.

    ignore: fields that may differ (e.g. where a run computes, not what it computes).
    added: {field: value} for fields newer than `before`'s code: absent there, `before`
      meant this value (what that code did).
    """
    old, new = {**(added or {}), **_flat(before.to_dict())}, _flat(after.to_dict())
    return [
        f"{key}: {old.get(key, 'absent')!r} -> {new.get(key, 'absent')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and key not in ignore
    ]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


# configs/ of a source checkout (an editable install): where load_config looks.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def load_config(spec: str, config_dir: str = CONFIG_DIR) -> ml_collections.ConfigDict:
    """get_config(arg) of configs/<name>.py for "name[:arg]", e.g. "default:mod_squad":
    the config the command line's --config=configs/default.py:mod_squad gives, for a
    notebook or a script."""
    name, _, arg = spec.partition(":")
    path = os.path.join(config_dir, f"{name.removesuffix('.py')}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: configs are read from the configs/ directory of a source "
            "checkout (install the repository with pip install -e)"
        )
    return sibling_config(path, name.removesuffix(".py"), arg or None)


def sibling_config(file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """get_config(arg) of configs/<name>.py beside the config file `file` (__file__):
    config files are loaded by path, not as a package, so one reuses another this way."""
    path = os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"mtm_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_weights(text: str, what: str) -> dict[str, float]:
    """ "a=1, b/c=0.5" -> {"a": 1.0, "b/c": 0.5}; `what` names the field in errors."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{what}: {item!r} is not of the form name=weight (in {text!r})")
        if name in weights:
            raise ValueError(f"{what}: task {name!r} is named twice (in {text!r})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"{what}: weight {value!r} of {name!r} is not a number") from None
    return weights


def parse_tasks(text: str) -> tuple[dict[str, float], dict[str, int]]:
    """data.tasks "a=1, b=0.5@50" -> ({"a": 1.0, "b": 0.5}, {"b": 50}): weights, and the
    train-example limits of the tasks that carry an @N."""
    limits: dict[str, int] = {}
    items = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        body, at, limit = item.rpartition("@")
        if at:
            name = body.rpartition("=")[0].strip()
            try:
                limits[name] = int(limit)
            except ValueError:
                raise ValueError(
                    f"data.tasks: {item!r}: the example limit {limit!r} after @ is not an int"
                ) from None
            item = body
        items.append(item)
    return parse_weights(", ".join(items), "data.tasks"), limits


def format_weights(weights: Mapping[str, float]) -> str:
    """Inverse of parse_weights."""
    return ", ".join(f"{name}={weight:g}" for name, weight in weights.items())
