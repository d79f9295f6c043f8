"""Training: `train_and_evaluate(config, workdir)` and `python -m multitask_moe.train`.

    python -m multitask_moe.train --config=configs/default.py --workdir=/tmp/run \
        --config.num_train_steps=200

Modules: setup (config checks, mesh, data, abstract state, compiled steps), state (sharded
creation, optimizer), step (train / eval steps), loop (periodic actions, preemption, NaN
checks), checkpoint (Orbax), metrics (jsonl + TensorBoard), evaluate, plots, config_lib
(the config schema every configs/*.py starts from), runtime (command-line set-up).

The names below load on first use: the command line answers a bad flag without first
importing TensorFlow and Orbax.
"""

import importlib

_EXPORTS = {
    "ConfigError": "multitask_moe.errors",
    "Prepared": "multitask_moe.train.setup",
    "prepare": "multitask_moe.train.setup",
    "NonFiniteLossError": "multitask_moe.train.loop",
    "CheckpointWriteError": "multitask_moe.core.checkpoint",
    "train_and_evaluate": "multitask_moe.train.train",
    "run": "multitask_moe.train.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multitask_moe.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
