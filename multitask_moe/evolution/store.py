"""The whole evolving system in an Orbax checkpoint, written after every generation.

Two items per step: "arrays" (every live component's parameters, statistics and Adam
moments, by component id) and "meta" (JSON: the components' names, locks and origins,
the paths with their architectures and scores, the finished tasks, the records, where the
run stands and the random generator's state). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed at any moment resumes from the
last whole generation with every lock as it was; a step that cannot be read is moved
aside and the generation before resumes (core/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from multitask_moe.core.checkpoint import Checkpoints
from multitask_moe.evolution.components import Component, ComponentPool
from multitask_moe.evolution.path_model import Architecture
from multitask_moe.evolution.paths import Path
from multitask_moe.evolution.settings import Settings
from multitask_moe.evolution.system import System
from multitask_moe.models.keys import path_of_stored_key, stored_key

logger = logging.getLogger(__name__)


class SystemCheckpoints:
    """The checkpoints of one evolution workdir (workdir/system), through the checkpoint
    layer training uses (core/checkpoint.py): atomic steps, a killed run's partial
    steps removed (the evolution command is the only writer), an unreadable step moved
    aside to system.unreadable/ and the one before restored, a failed write named."""

    def __init__(self, directory: str, keep: int = 2):
        self.checkpoints = Checkpoints(
            directory, keep=keep, enable_async=False, writer=True, items=("arrays", "meta")
        )
        self.directory = self.checkpoints.directory

    def latest_step(self) -> int | None:
        return self.checkpoints.latest_step()

    def save(self, step: int, system: System) -> None:
        """Writes `step` and waits for it (CheckpointWriteError if it cannot)."""
        arrays, meta = _serialize(system)
        self.checkpoints.save(step, arrays, meta)
        self.checkpoints.wait()

    def restore(self, settings: Settings, warn=logger.warning) -> System | None:
        """The system of the latest readable step (built on `settings`), or None if there
        is none; `warn` gets one line for each unreadable step moved aside."""
        restored = self.checkpoints.restore_latest_readable(None, warn)
        if restored is None:
            return None
        _, arrays, meta = restored
        system = System(settings)
        _deserialize(system, arrays, dict(meta))
        return system

    def close(self) -> None:
        self.checkpoints.close()


def _serialize(system: System) -> tuple[dict, dict]:
    arrays, components = {}, []
    for component in system.pool:
        statistics = component.statistics or {}
        entry = {
            "params": {stored_key(k): np.asarray(v) for k, v in component.params.items()},
            "statistics": {stored_key(k): np.asarray(v) for k, v in statistics.items()},
            "opt": {
                f"{slot}.{stored_key(path)}": np.asarray(v)
                for (slot, path), v in (component.opt_state or {}).items()
            },
        }
        arrays[f"c{component.id}"] = {kind: leaves for kind, leaves in entry.items() if leaves}
        components.append(
            {
                "id": component.id,
                "name": component.name,
                "locks": sorted(component.locks),
                "origin": component.origin,
            }
        )
    meta = {
        "next_id": system.pool.next_id,
        "components": components,
        "paths": [
            {
                **dataclasses.asdict(path),
                "hparams": dict(path.hparams),
                "architecture": dataclasses.asdict(system.arch[path.id]),
            }
            for path in system.paths.values()
        ],
        "best": system.best,
        "records": system.records,
        "root": system.root,
        "root_params": system.root_params,
        "progress": system.progress,
        "lineage": {str(k): v for k, v in system.lineage.items() if k in system.pool},
        "rng": system.rng.bit_generator.state,
    }
    return arrays, meta


def _deserialize(system: System, arrays: dict, meta: dict) -> None:
    components = []
    for entry in meta["components"]:
        stored = arrays.get(f"c{entry['id']}", {})

        def leaves(kind, stored=stored):
            return {path_of_stored_key(k): np.asarray(v) for k, v in stored.get(kind, {}).items()}

        params, opt = leaves("params"), {}
        for key, value in stored.get("opt", {}).items():
            slot, _, path = key.partition(".")
            path = path_of_stored_key(path)
            # Older checkpoints keyed moments by the nnx Variable's `.value` and, with
            # expert slots, gave a block every expert's moments: keep a component's own.
            if path[-1:] == ("value",):
                path = path[:-1]
            if path in params:
                opt[(slot, path)] = np.asarray(value)
        components.append(
            Component(
                entry["id"],
                entry["name"],
                params,
                opt or None,
                frozenset(entry["locks"]),
                entry["origin"],
                leaves("statistics"),
            )
        )
    system.pool = ComponentPool(components, next_id=meta["next_id"])
    system.paths, system.arch = {}, {}
    for entry in meta["paths"]:
        arch = entry.pop("architecture")
        arch["adapters"] = tuple(tuple(pair) for pair in arch["adapters"])
        # A system saved before expert slots existed has neither field: whole blocks.
        experts = arch.get("experts", ())
        arch["experts"] = tuple((block, tuple(slots)) for block, slots in experts)
        entry["components"] = tuple(entry["components"])
        path = Path(**entry)
        system.paths[path.id] = path
        system.arch[path.id] = Architecture(**arch)
    system.best = {task: int(path) for task, path in meta["best"].items()}
    system.records = meta["records"]
    system.root = int(meta["root"])
    system.root_params = float(meta["root_params"])
    system.progress = meta["progress"]
    system.lineage = {int(k): v for k, v in meta["lineage"].items()}
    system.rng.bit_generator.state = meta["rng"]
