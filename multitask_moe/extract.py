"""python -m multitask_moe.extract --workdir=W --task=NAME --out=O [--threshold=3]
    [--router=auto|sliced|full] [--usage=ema|data] [--export] [--overwrite]
    [--mesh=data=1,expert=1]

Extracts one task's standalone model from the latest checkpoint of the training workdir
W into the directory O (multitask_moe.lifecycle.extract; docs/lifecycle.md). --mesh
restores the trained model onto other axis sizes than its config's (e.g. extraction on a
one-device machine from a run on a pod slice). Bad input
(unknown task, no checkpoint, nothing to extract, a bad threshold, O holding another
model, no usage statistics) prints one `error:` line, exits with status 2 and writes
nothing.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from multitask_moe.core import runtime  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to extract from.")
_TASK = flags.DEFINE_string("task", None, "The task to extract, e.g. digits/class.")
_OUT = flags.DEFINE_string("out", None, "Directory for the extracted model.")
_THRESHOLD = flags.DEFINE_float(
    "threshold", 3.0, "Keep experts whose usage share exceeds threshold / top_k percent."
)
_ROUTER = flags.DEFINE_string(
    "router", "auto", "sliced | full | auto (full for task routing, sliced otherwise)."
)
_USAGE = flags.DEFINE_string(
    "usage", "ema", "ema (the checkpoint's statistics) | data (count on training examples)."
)
_EXPORT = flags.DEFINE_bool("export", False, "Also write a jax.export artifact of the forward.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a model already in --out.")
_MESH = flags.DEFINE_string(
    "mesh", "", "Mesh to restore the trained model on, e.g. data=1,expert=1 ('' = config's)."
)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        runtime.fail(f"unexpected arguments {argv[1:]}")
    for flag in (_WORKDIR, _TASK, _OUT):
        if not flag.value:
            runtime.fail(f"--{flag.name} is required")
    mesh = runtime.parse_mesh(_MESH.value)

    from multitask_moe import lifecycle  # TensorFlow loads only now

    try:
        runtime.configure_jax(lifecycle.load_config(_WORKDIR.value))
        summary = lifecycle.extract(
            _WORKDIR.value,
            _TASK.value,
            _OUT.value,
            threshold=_THRESHOLD.value,
            router=_ROUTER.value,
            usage=_USAGE.value,
            export=_EXPORT.value,
            overwrite=_OVERWRITE.value,
            mesh=mesh,
        )
    except ValueError as error:  # ExtractionError, WorkdirError, ConfigError
        runtime.fail(str(error))
    kept = ", ".join(f"{name}: {len(ids)}" for name, ids in summary["kept_experts"].items())
    print(
        f"{summary['task']}: kept experts {kept}; parameters {summary['params_extracted']:,} "
        f"of {summary['params_full']:,} ({summary['params_ratio']:.2f}x)\n"
        f"accuracy full / extracted / agreement: "
        + json.dumps(
            {
                split: [
                    round(summary["accuracy_full"][split], 4),
                    round(summary["accuracy_extracted"][split], 4),
                    round(summary["agreement"][split], 4),
                ]
                for split in summary["agreement"]
            }
        )
        + f"\nWritten: {os.path.abspath(_OUT.value)}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: runtime.parse_flags(argv, flags.FLAGS))
    sys.exit(0)
