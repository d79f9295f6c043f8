"""Train-step benchmark: the default MoE model (capacity 1.25, and dropless as
configs/default.py:dropless) vs the dense model with the same active parameters, in one
process, on the default config's mesh (8 simulated CPU devices).

    .venv/bin/python benchmarks/train_step.py --out=benchmarks/results/train_step.json

Reports, for each model: compile time of the train step, median step time over several
timed runs (MoE and dense runs interleaved, so machine load hits both alike), examples/s,
and peak host memory (RSS sampled while that model was built, compiled and stepped).
The headline is the ratio MoE / dense step time (target <= 1.3), as the median of paired
back-to-back runs, in wall time and in this process's CPU time; beside it the dropless MoE
over the capacity one (its exchange is the layer's "auto": the ring on CPU). Speed claims live here,
as ratios measured in one process, never as timed assertions in tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


class PeakMemory:
    """Samples this process's RSS every few ms; `peak` is the max since the last reset."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def reset(self) -> int:
        peak, self.peak = self.peak, self._process.memory_info().rss
        return peak

    def close(self):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON result")
    parser.add_argument("--runs", type=int, default=9, help="timed runs per model")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--routing", default="task_tokens", help="routing of the MoE model")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of both configs, e.g. model.moe.capacity_factor=1.0",
    )
    args = parser.parse_args()

    configs = {
        "moe": load_config("default", f"routing={args.routing}"),
        "moe_dropless": load_config("default", f"routing={args.routing},dropless"),
        "dense": load_config("dense"),
    }
    for item in args.set:
        key, value = item.split("=", 1)
        for config in configs.values():
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else float(value)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    from multitask_moe.core import runtime

    runtime.configure_jax(configs["moe"])  # 8 CPU devices, before JAX starts

    import jax
    from absl import logging

    from multitask_moe import parallel
    from multitask_moe.core.evaluate import global_batch
    from multitask_moe.core.state import count_params, create_state
    from multitask_moe.core.step import TRAIN_KEYS
    from multitask_moe.train import setup

    logging.set_verbosity(logging.WARNING)
    memory = PeakMemory()
    models = {}
    for name, config in configs.items():
        memory.reset()
        experiment = setup.prepare(config)
        with jax.set_mesh(experiment.mesh):
            state = create_state(experiment.model.spec, config.seed)
            sharding = parallel.batch_sharding(experiment.mesh)
            local = experiment.mixture.iterator("train", batch_size=config.batch_size, seed=0)
            batches = [global_batch(next(local), TRAIN_KEYS, sharding) for _ in range(4)]
            for i in range(args.warmup):
                state, _ = experiment.train_step(state, batches[i % len(batches)])
            jax.block_until_ready(state)
        models[name] = {
            "experiment": experiment,
            "state": state,
            "batches": batches,
            "times": [],
            "cpu_times": [],
            "peak": memory.reset(),
        }

    for _ in range(args.runs):
        for entry in models.values():  # interleaved: load on the machine hits both
            experiment = entry["experiment"]
            memory.reset()
            with jax.set_mesh(experiment.mesh):
                state = entry["state"]
                start, start_cpu = time.perf_counter(), time.process_time()
                for i in range(args.steps):
                    state, _ = experiment.train_step(state, entry["batches"][i % 4])
                jax.block_until_ready(state)
                entry["times"].append((time.perf_counter() - start) / args.steps)
                entry["cpu_times"].append((time.process_time() - start_cpu) / args.steps)
                entry["state"] = state
            entry["peak"] = max(entry["peak"], memory.reset())
    memory.close()

    results = {}
    for name, entry in models.items():
        experiment = entry["experiment"]
        step = statistics.median(entry["times"])
        results[name] = {
            "step_seconds_median": step,
            "step_seconds_all": entry["times"],
            "step_cpu_seconds_median": statistics.median(entry["cpu_times"]),
            "examples_per_sec": experiment.config.batch_size / step,
            "compile_seconds": experiment.compile_seconds,
            "peak_host_memory_mib": entry["peak"] / 2**20,
            "parameters": count_params(experiment.model.spec.abstract["params"]),
            "batch_size": experiment.config.batch_size,
            "mesh": {k: int(v) for k, v in experiment.mesh.shape.items()},
        }
    moe_cfg = configs["moe"].model

    # Paired ratios (run i of MoE over run i of dense, taken back to back) are robust to
    # load that drifts over the benchmark; CPU time (all threads of this process) is
    # robust to other processes on the machine.
    def paired(a: str, b: str, key: str = "times") -> float:
        return statistics.median(x / y for x, y in zip(models[a][key], models[b][key], strict=True))

    ratio, cpu_ratio = paired("moe", "dense"), paired("moe", "dense", "cpu_times")
    dropless_ratio = paired("moe_dropless", "moe")
    summary = {
        "ratio_moe_over_dense": ratio,
        "cpu_time_ratio_moe_over_dense": cpu_ratio,
        "ratio_dropless_over_capacity": dropless_ratio,
        "ratio_dropless_over_dense": paired("moe_dropless", "dense"),
        "target_ratio": 1.3,
        "moe": {
            "routing": args.routing,
            "num_experts": moe_cfg.moe.num_experts,
            "top_k": moe_cfg.moe.top_k,
            "d_hidden": moe_cfg.moe.d_hidden or moe_cfg.mlp_dim // moe_cfg.moe.top_k,
            "capacity_factor": moe_cfg.moe.capacity_factor,
            "moe_every": moe_cfg.moe_every,
        },
        "dense_mlp_dim": configs["dense"].model.mlp_dim,
        "runs": args.runs,
        "steps_per_run": args.steps,
        "overrides": args.set,
        "devices": len(jax.devices()),
        "platform": jax.devices()[0].platform,
        "results": results,
    }
    print(
        f"\ntrain step, default config ({summary['devices']} {summary['platform']} devices, "
        f"batch {configs['moe'].batch_size}, median of {args.runs} runs x {args.steps} steps)"
    )
    print(
        f"{'model':<13}{'params':>10}{'step ms':>10}{'examples/s':>12}{'compile s':>11}"
        f"{'peak RSS MiB':>14}"
    )
    for name, r in results.items():
        print(
            f"{name:<13}{r['parameters']:>10,}{1e3 * r['step_seconds_median']:>10.1f}"
            f"{r['examples_per_sec']:>12.0f}{r['compile_seconds']:>11.1f}"
            f"{r['peak_host_memory_mib']:>14.0f}"
        )
    print(
        f"MoE / dense step time: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time "
        "(median of paired runs; target <= 1.3x)"
    )
    print(f"MoE dropless / MoE capacity {moe_cfg.moe.capacity_factor}: {dropless_ratio:.2f}x wall")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
