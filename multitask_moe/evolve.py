"""python -m multitask_moe.evolve --config=configs/evolve.py --workdir=W [--config.k=v]

Introduces the configured tasks one after another into a growing system (muNet; the
multitask_moe.evolution package, docs/methods.md section 3). After every generation the
whole system is checkpointed in W/system and W/evolution.json is rewritten; the same
command resumes a killed run from its last generation. At the end it prints a per-task
table and writes W/system.png (tasks x components). With --config.evolve.baseline=True
each task is also fine-tuned from the root as a full copy, for comparison.

Bad input (an unknown task, s outside (0, 1], mu outside [0, 1], an empty task list,
devices_per_child that does not divide the devices, the batches or the experts, a
workdir made by a different config) prints one `error:` line, exits with status 2 and
writes nothing. Where children compute (evolve.devices_per_child) may change on a
resume.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from multitask_moe.core import runtime  # noqa: E402
from multitask_moe.errors import ConfigError, one_line  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evolution config file, configs/evolve.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the evolving system.")

SYSTEM_DIR = "system"
SUMMARY_FILE = "evolution.json"
# Where children compute, not what the system is: a resumed run may change them.
PLACEMENT_FIELDS = ("evolve.devices_per_child",)
# Settings named as in config.evolve.
EVOLVE_FIELDS = (
    "generations",
    "children",
    "steps",
    "validations",
    "size_scale",
    "mu",
    "learning_rate",
    "adapter_size",
    "free_expert_slots",
    "devices_per_child",
)
# Fields newer than some workdirs, and what a workdir without them ran.
ADDED_FIELDS = {"evolve.free_expert_slots": 0, "evolve.devices_per_child": 1}


def settings_from_config(config):
    """evolution.Settings of an evolution config (configs/evolve.py)."""
    from multitask_moe.evolution import Settings

    evolve = config.evolve
    return Settings(
        tasks=tuple(name.strip() for name in evolve.tasks.split(",") if name.strip()),
        model=config.model,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        weight_decay=config.optimizer.weight_decay,
        aux_weights=dict(config.aux_loss.to_dict()),
        image_size=config.data.image_size,
        patch_size=config.data.patch_size,
        data_dir=config.data.data_dir or None,
        seed=config.seed,
        **{name: evolve[name] for name in EVOLVE_FIELDS},
    )


def evolve(config, workdir: str) -> dict:
    """Runs (or resumes) the evolution of `config` in `workdir`; returns evolution.json.

    Raises ConfigError (before writing anything) for a config that cannot run, RunLockError
    (a ConfigError) when another live run is evolving in `workdir`.
    """
    from multitask_moe.core.run_lock import claim

    settings = settings_from_config(config)
    settings.check()
    # Claimed before the tasks' data or any model is built (run_lock.claim).
    with claim(workdir):
        return _evolve_claimed(config, settings, workdir)


def _evolve_claimed(config, settings, workdir: str) -> dict:

    from multitask_moe.core import config_lib, files
    from multitask_moe.evolution import System, report
    from multitask_moe.evolution.store import SystemCheckpoints

    before = config_lib.read_config(workdir)
    if before is not None:
        changed = config_lib.changed_fields(
            before, config, ignore=PLACEMENT_FIELDS, added=ADDED_FIELDS
        )
        if changed:
            raise ConfigError(
                f"workdir {workdir} was made by a different config ({', '.join(changed[:4])}"
                f"{' ...' if len(changed) > 4 else ''}); use a new --workdir"
            )
    system = System(settings)  # builds the tasks' data: an unknown task raises here
    files.write_config(workdir, config)
    checkpoints = SystemCheckpoints(os.path.join(workdir, SYSTEM_DIR))
    try:
        restored = checkpoints.restore(settings, warn=runtime.warn)
        if restored is not None:
            system = restored
            print(f"Resuming: {len(system.best)} tasks done, {system.progress}.", flush=True)
        step = [checkpoints.latest_step() or 0]
        summary_path = os.path.join(workdir, SUMMARY_FILE)

        def save(system):
            step[0] += 1
            checkpoints.save(step[0], system)
            files.write_json(summary_path, report.summary(system))
            done = len(system.best)
            print(
                f"task {done}/{len(settings.tasks)}, generation {system.progress['generation']}: "
                f"{len(system.pool)} live components",
                flush=True,
            )

        system.run(on_step=save)
        baseline = {}
        if config.evolve.baseline:
            baseline = {task: system.finetune(task) for task in settings.tasks}
        contents = report.summary(system, baseline)
        files.write_json(summary_path, contents)
        report.picture(system, os.path.join(workdir, "system.png"))
        print(report.table(system, baseline), flush=True)
        return contents
    finally:
        checkpoints.close()


def main(argv: list[str]) -> None:
    config = runtime.command_config(argv, _CONFIG, _WORKDIR, "workdir/evolve")
    from multitask_moe.core.checkpoint import CheckpointWriteError  # Orbax loads now

    try:
        evolve(config, _WORKDIR.value)
    except (ValueError, KeyError) as error:  # ConfigError, an unknown task (KeyError)
        runtime.fail(one_line(error))
    except CheckpointWriteError as error:  # the system as of the last whole generation stays
        runtime.fail(str(error), status=1)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: runtime.parse_flags(argv, flags.FLAGS))
    sys.exit(0)
