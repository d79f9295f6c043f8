"""python -m multitask_moe.train --config=configs/default.py[:arg] --workdir=DIR [--config.k=v]

Flag parsing only; the run is train.train_and_evaluate. A config that cannot run (bad
flag, unknown key, unknown task, sizes that do not divide the mesh, ...) prints one
`error:` line and exits with status 2 before anything is written to the workdir.
"""

from __future__ import annotations

import os
import sys

# TensorFlow (the input pipeline) reads this when it loads: keep its C++ INFO lines away.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from multitask_moe.core import runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, configs/<name>.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, plots; a run resumes from it."
)


def main(argv: list[str]) -> None:
    config = runtime.command_config(argv, _CONFIG, _WORKDIR, "workdir/default")

    from multitask_moe import errors
    from multitask_moe.core import checkpoint
    from multitask_moe.train import loop, train

    try:
        # The workdir is claimed first; every other check and all building come after.
        train.train_and_evaluate(config, _WORKDIR.value)
    except errors.ConfigError as error:  # a bad config, a busy workdir, a checkpoint that
        runtime.fail(str(error))  # does not fit: nothing written
    except (loop.NonFiniteLossError, checkpoint.CheckpointWriteError) as error:
        runtime.fail(str(error), status=1)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: runtime.parse_flags(argv, flags.FLAGS))
    sys.exit(0)
