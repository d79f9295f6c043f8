"""python -m multitask_moe.evaluate --workdir=DIR [--splits=validation,test]
    [--mesh=data=8,expert=1]

Restores the latest checkpoint of a training workdir or an extracted model, prints the
per-task table and writes DIR/evaluation.json with accuracy and loss per task and split
(multitask_moe.lifecycle.evaluate_workdir). --mesh replaces the config's mesh axis sizes.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from multitask_moe.core import runtime  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or extracted model directory.")
_SPLITS = flags.DEFINE_list("splits", ["validation", "test"], "Splits to evaluate.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. data=8,expert=1 ('' = config's).")


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        runtime.fail(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        runtime.fail("--workdir is required")
    mesh = runtime.parse_mesh(_MESH.value)

    from multitask_moe import lifecycle  # TensorFlow loads only now

    try:
        runtime.configure_jax(lifecycle.load_config(_WORKDIR.value))
        lifecycle.evaluate_workdir(_WORKDIR.value, tuple(_SPLITS.value), mesh=mesh)
    except ValueError as error:  # WorkdirError, ConfigError, an unknown split
        runtime.fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: runtime.parse_flags(argv, flags.FLAGS))
    sys.exit(0)
