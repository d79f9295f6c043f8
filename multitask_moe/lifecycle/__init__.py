"""What happens to tasks after a model exists: evaluate a trained workdir, extract a
per-task model, export it (docs/lifecycle.md).

    from multitask_moe import lifecycle
    summary = lifecycle.extract("workdir/mod_squad", "digits/class", "workdir/digits_class")
    results = lifecycle.evaluate_workdir("workdir/digits_class")
"""

from multitask_moe.core.workdir import Restored, WorkdirError, load_config, restore
from multitask_moe.lifecycle.evaluation import evaluate_workdir
from multitask_moe.lifecycle.extraction import ExtractionError, extract
from multitask_moe.lifecycle.selection import kept_experts

__all__ = [
    "ExtractionError",
    "Restored",
    "WorkdirError",
    "evaluate_workdir",
    "extract",
    "kept_experts",
    "load_config",
    "restore",
]
