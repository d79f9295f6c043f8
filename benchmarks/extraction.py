"""Extraction benchmark: each task's extracted model against the full multitask model.

    .venv/bin/python benchmarks/extraction.py --out=benchmarks/results/extraction.json

For the `mod_squad` variant of the default config (MoA + MoE, per-task routers, MI loss)
and for its `routing=task` variant (Task-MoE), trains the default run (a subprocess on
the config's 8-device mesh; a finished run in --workdir is reused), then for every task:
extracts it (lifecycle.extract, threshold 3), and measures on the same devices
(--devices, one by default: serving needs no expert parallelism) and the same batch of
that task's test examples:

- parameter ratio extracted / full, and the experts kept per layer;
- inference throughput (examples/s after compile; median over interleaved runs) of the
  extracted model against the full model, the full model both as configured (routing
  groups of its one-device eval batch) and with the extracted model's routing groups
  (one sequence): the second isolates what dropping experts buys from what the group
  size does to capacity dispatch;
- peak memory of each compiled forward, XLA's figure (arguments + temporaries + outputs);
- accuracy of both models and their agreement (from extraction.json).

The issue's target: >= 1.5x the full model's throughput for the tasks that keep at most
half of the experts. Figures are measured, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"mod_squad": "mod_squad", "task": "routing=task"}


def train(variant: str, steps: int, workdir: str) -> None:
    """The default run of `variant` for `steps` steps (a no-op when already there)."""
    command = [
        sys.executable,
        "-m",
        "multitask_moe.train",
        f"--config={os.path.join(REPO, 'configs', 'default.py')}:{VARIANTS[variant]}",
        f"--workdir={workdir}",
        f"--config.num_train_steps={steps}",
        f"--config.eval_every_steps={steps}",
        f"--config.checkpoint_every_steps={steps}",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"training {variant} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    print(f"{variant}: trained {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)


def benchmark_variant(variant: str, workdir: str, args, mesh: dict) -> dict:
    from multitask_moe import lifecycle
    from multitask_moe.core import build as build_lib
    from multitask_moe.lifecycle import timing
    from multitask_moe.lifecycle.timing import Timed

    config = lifecycle.load_config(workdir)
    full = lifecycle.restore(workdir, mesh=mesh)
    tasks = args.tasks or list(full.experiment.task_names)
    length = int(full.experiment.token_shape[0])
    same_groups = config.copy_and_resolve_references()
    if same_groups.model.moe_every:
        same_groups.model.moe.group_size = length
    full_same_groups = lifecycle.restore(workdir, same_groups, mesh=mesh)
    rows = []
    for task in tasks:
        out = os.path.join(args.workdir, "extracted", variant, task.replace("/", "_"))
        start = time.perf_counter()
        summary = lifecycle.extract(
            workdir, task, out, threshold=args.threshold, overwrite=True, mesh=mesh
        )
        extract_seconds = time.perf_counter() - start
        extracted = lifecycle.restore(out, mesh=mesh)
        task_id = full.experiment.task_names.index(task)
        models = {
            "full": Timed(full, task_id, args.batch),
            "full_same_groups": Timed(full_same_groups, task_id, args.batch),
            "extracted": Timed(extracted, 0, args.batch),
        }
        timing.run_interleaved(models, args.runs, args.calls)
        throughput = {
            name: args.batch / statistics.median(timed.times) for name, timed in models.items()
        }

        def paired(name, models=models):
            return timing.speedup(models[name], models["extracted"])

        kept = summary["kept_experts"]
        row = {
            "task": task,
            "kept_experts": {name: len(ids) for name, ids in kept.items()},
            "experts_full": summary["experts_full"],
            "kept_fraction_max": max(
                len(ids) / summary["experts_full"][name] for name, ids in kept.items()
            ),
            "params_full": summary["params_full"],
            "params_extracted": summary["params_extracted"],
            "params_ratio": summary["params_ratio"],
            "examples_per_s": throughput,
            "speedup": paired("full_same_groups"),
            "speedup_vs_configured_groups": paired("full"),
            "peak_bytes": {name: timed.peak_bytes for name, timed in models.items()},
            "peak_ratio": models["extracted"].peak_bytes / models["full_same_groups"].peak_bytes,
            "accuracy_full": summary["accuracy_full"],
            "accuracy_extracted": summary["accuracy_extracted"],
            "agreement": summary["agreement"],
            "extract_seconds": extract_seconds,
        }
        rows.append(row)
        print(
            f"{variant:>9} {task:<15} kept {row['kept_experts']} params "
            f"{row['params_ratio']:.2f}x speedup {row['speedup']:.2f}x "
            f"(configured groups {row['speedup_vs_configured_groups']:.2f}x) peak "
            f"{row['peak_ratio']:.2f}x test acc {row['accuracy_full']['test']:.3f} -> "
            f"{row['accuracy_extracted']['test']:.3f}",
            flush=True,
        )
    half = [r["speedup"] for r in rows if r["kept_fraction_max"] <= 0.5]
    return {
        "workdir": workdir,
        "moe_routing_group_tokens": {
            "full": build_lib.routing_group_size(
                full.experiment.config, full.experiment.mesh, length
            ),
            "extracted": length,
        },
        "tasks": rows,
        "tasks_keeping_at_most_half": len(half),
        "speedup_median_at_most_half": statistics.median(half) if half else None,
        "speedup_median_all": statistics.median(r["speedup"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON result")
    parser.add_argument("--workdir", default=None, help="where runs and extractions go")
    parser.add_argument("--variants", default="mod_squad,task", help="of " + ",".join(VARIANTS))
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: all)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per variant")
    parser.add_argument("--threshold", type=float, default=3.0, help="extraction threshold, %%")
    parser.add_argument("--batch", type=int, default=128, help="examples per forward")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices of the forwards")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per model")
    parser.add_argument("--calls", type=int, default=5, help="forward calls per timed run")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; allowed: {list(VARIANTS)}")
    scratch = None
    if args.workdir is None:
        args.workdir = scratch = tempfile.mkdtemp(prefix="extraction-bench-")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    mesh = {"data": args.devices, "expert": 1}
    results = {}
    start = time.perf_counter()
    try:
        for variant in variants:
            workdir = os.path.join(args.workdir, variant)
            train(variant, args.steps, workdir)
            results[variant] = benchmark_variant(variant, workdir, args, mesh)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "target_speedup_at_most_half": 1.5,
        "steps": args.steps,
        "threshold": args.threshold,
        "batch": args.batch,
        "devices": args.devices,
        "platform": jax.devices()[0].platform,
        "runs": args.runs,
        "calls_per_run": args.calls,
        "seconds": time.perf_counter() - start,
        "variants": results,
    }
    for variant, result in results.items():
        print(
            f"{variant}: median speedup {result['speedup_median_all']:.2f}x over all tasks; "
            f"{result['tasks_keeping_at_most_half']} tasks keep at most half the experts"
            + (
                f" (median {result['speedup_median_at_most_half']:.2f}x, target 1.5x)"
                if result["speedup_median_at_most_half"] is not None
                else ""
            )
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
