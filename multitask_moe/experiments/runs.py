"""The runs behind the claims: one training (or evolution) config per (run, seed), run
once in this process and read back from its workdir afterwards.

Every run is a config file of configs/ with its `:arg` and a few field overrides, so
each is also a command a user can type (`Runner.command`). The experiments change the
configs only where a comparison needs it: a data-parallel mesh over the devices the
process has (one CPU device under `python -m multitask_moe.experiments`; the sharded
layers equal the unsharded ones, tests/test_expert_parallel.py) instead of the simulated
(2, 4) mesh, the step counts of the Scale, no periodic evaluation, checkpoint or plots,
and the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import ml_collections

from multitask_moe.core import config_lib
from multitask_moe.experiments.scale import Scale

DONE_FILE = "experiment_run.json"

# configs/dense.py's changes, for configs that have no dense variant of their own.
DENSE_FIELDS = (
    ("model.moe_every", 0),
    ("model.moa_every", 0),
    ("aux_loss.load_balance", 0.0),
    ("aux_loss.router_z", 0.0),
    ("aux_loss.mutual_info", 0.0),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run.

    name: its directory under <root>/seed<k>/.
    config: "<file in configs/ without .py>[:arg]", e.g. "default:routing=task".
    steps: which Scale field sets num_train_steps ("multitask", "single", "add", "later").
    fields: config overrides, (dotted key, value) pairs.
    init_from: the name of the run whose trained model this one starts from.
    """

    name: str
    config: str
    steps: str
    fields: tuple[tuple[str, object], ...] = ()
    init_from: str | None = None


class Runner:
    """Runs of one Scale under `root`, each trained at most once: a finished run leaves
    DONE_FILE with its final metrics. The runs checkpoint only at their end (or on
    SIGTERM), so a run killed midway trains again from its start or its SIGTERM
    checkpoint."""

    def __init__(self, root: str, scale: Scale, log: Callable[[str], None] = print):
        self.root = root
        self.scale = scale
        self.log = log

    def workdir(self, name: str, seed: int) -> str:
        return os.path.join(self.root, f"seed{seed}", name)

    def config(self, run: Run, seed: int) -> ml_collections.ConfigDict:
        steps = getattr(self.scale, f"{run.steps}_steps")
        config = config_lib.load_config(run.config)
        changes = {
            "seed": seed,
            "num_cpu_devices": 0,
            "mesh.data": -1,  # data parallel over the devices there are (one on a CPU)
            "mesh.expert": 1,
            "num_train_steps": steps,
            "eval_every_steps": 0,
            "checkpoint_every_steps": 0,
            "keep_checkpoints": 1,
            "write_plots": False,
            "optimizer.warmup_steps": min(config.optimizer.warmup_steps, steps // 5),
            "log_every_steps": min(config.log_every_steps, steps),
            **dict(run.fields),
        }
        if run.init_from:
            changes["init_from"] = self.workdir(run.init_from, seed)
        return config_lib.set_fields(config, changes)

    def command(self, run: Run, seed: int) -> str:
        """The shell command that trains this run."""
        config = config_lib.load_config(run.config)
        ours = self.config(run, seed)
        flags = " ".join(
            f"--config.{key}={value}"
            for key, value in _flat_changes(config.to_dict(), ours.to_dict()).items()
        )
        return (
            f"python -m multitask_moe.train --config=configs/{run.config.replace(':', '.py:', 1)}"
            f"{'' if ':' in run.config else '.py'} --workdir={self.workdir(run.name, seed)} {flags}"
        )

    def train(self, run: Run, seed: int, runs: dict[str, Run]) -> dict:
        """The run's final metrics ({"metrics": {...}, "seconds": ...}), training it (and
        the run it starts from) first when it has not finished."""
        workdir = self.workdir(run.name, seed)
        done = os.path.join(workdir, DONE_FILE)
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        if run.init_from:
            self.train(runs[run.init_from], seed, runs)
        from multitask_moe.core.files import write_json  # written whole or not at all
        from multitask_moe.train import train as train_lib

        self.log(f"seed {seed}: training {run.name}")
        start = time.perf_counter()
        metrics = train_lib.train_and_evaluate(self.config(run, seed), workdir)
        if not metrics:
            raise RuntimeError(f"{run.name} (seed {seed}) stopped before its last step")
        record = {
            "run": run.name,
            "seed": seed,
            "command": self.command(run, seed),
            "seconds": time.perf_counter() - start,
            "metrics": metrics,
        }
        write_json(done, record)
        return record

    def evolve(self, name: str, seed: int, size_scale: float, baseline: bool) -> dict:
        """evolution.json of configs/evolve.py at this Scale with `size_scale`."""
        workdir = self.workdir(name, seed)
        done = os.path.join(workdir, DONE_FILE)
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        from multitask_moe import evolve as evolve_cli
        from multitask_moe.core.files import write_json

        scale = self.scale
        config = config_lib.set_fields(
            config_lib.load_config(f"evolve:size_scale={size_scale},baseline={baseline}"),
            {
                "seed": seed,
                "num_cpu_devices": 0,
                "evolve.tasks": ", ".join(scale.evolve_tasks),
                "evolve.generations": scale.evolve_generations,
                "evolve.children": scale.evolve_children,
                "evolve.steps": scale.evolve_steps,
            },
        )
        self.log(f"seed {seed}: evolving {name}")
        start = time.perf_counter()
        summary = evolve_cli.evolve(config, workdir)
        record = {"run": name, "seed": seed, "seconds": time.perf_counter() - start, **summary}
        write_json(done, record)
        return record


def _flat_changes(before: dict, after: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict):
            out.update(_flat_changes(old or {}, value, f"{prefix}{key}."))
        elif value != old:
            out[f"{prefix}{key}"] = f"'{value}'" if isinstance(value, str) else value
    return out
