"""The whole evolving system in an Orbax checkpoint, written after every generation.

Two items per step: "arrays" (every live component's parameters, statistics and Adam
moments, by component id) and "meta" (JSON: the components' names, locks and origins,
the paths with their architectures and scores, the finished tasks, the records, where the
run stands and the random generator's state). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed at any moment resumes from the
last whole generation with every lock as it was.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import orbax.checkpoint as ocp

from multitask_moe.evolution.components import Component, ComponentPool
from multitask_moe.evolution.path_model import Architecture
from multitask_moe.evolution.paths import Path
from multitask_moe.evolution.settings import Settings
from multitask_moe.evolution.system import System


def encode(path: tuple) -> str:
    """("blocks", 0, "mlp") -> "blocks.#0.mlp" (a flat key Orbax can store)."""
    return ".".join(f"#{k}" if isinstance(k, int) else str(k) for k in path)


def decode(text: str) -> tuple:
    return tuple(int(k[1:]) if k.startswith("#") else k for k in text.split("."))


class SystemCheckpoints:
    """CheckpointManager of one evolution workdir (workdir/system)."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # The evolution command is the only writer: a killed run's partial step
            # directories are removed (see train.checkpoint.Checkpoints).
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
            item_names=("arrays", "meta"),
            item_handlers={
                "arrays": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, system: System) -> None:
        arrays, meta = _serialize(system)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, settings: Settings) -> System | None:
        """The system of the latest step (built on `settings`), or None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        system = System(settings)
        _deserialize(system, restored["arrays"], dict(restored["meta"]))
        return system

    def close(self) -> None:
        self.manager.close()


def _serialize(system: System) -> tuple[dict, dict]:
    arrays, components = {}, []
    for component in system.pool:
        statistics = component.statistics or {}
        entry = {
            "params": {encode(k): np.asarray(v) for k, v in component.params.items()},
            "statistics": {encode(k): np.asarray(v) for k, v in statistics.items()},
            "opt": {
                f"{slot}.{encode(path)}": np.asarray(v)
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
            return {decode(k): np.asarray(v) for k, v in stored.get(kind, {}).items()}

        params, opt = leaves("params"), {}
        for key, value in stored.get("opt", {}).items():
            slot, _, path = key.partition(".")
            path = decode(path)
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
