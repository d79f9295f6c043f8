"""Parameters each task adds with expert-level cloning vs whole-block cloning: the same
evolution config, task sequence and seeds, with and without free expert slots.

    .venv/bin/python benchmarks/expert_cloning.py --out=benchmarks/results/expert_cloning.json

whole-block  configs/evolve.py as it is: an MoE block is one component, so a child that
             changes it clones all its experts
experts      the same with evolve.free_expert_slots=--slots: each expert is a component;
             a child may clone one expert into a free slot and reuse the others

For every task of the sequence: the parameters its best path added (components made new
or cloned) and how many of them are in MoE blocks, its accounted parameters P, its test
accuracy, how many of its components are expert copies in a free slot, and whether it
cloned an MoE block's shared part. Means over
--seeds. The two runs start from different roots (the slots change the root's expert
arrays, so its initialization) and draw their mutations differently, so their paths
differ beyond the cloning granularity; the seeds average that out only in part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def task_rows(system, root_experts: int) -> list[dict]:
    """Per finished task: what its best path added and how."""
    from multitask_moe.evolution import path_model

    statistics_of_root = path_model.flatten(system.state_of(system.root)["model_state"])
    moe_blocks = {f"block{path[1]}" for path in statistics_of_root if path[-1] == "usage"}
    rows = []
    for task, record in system.records.items():
        components = record["components"]
        added = [c for c in components.values() if c["kind"] != "reused"]
        in_free_slots = [
            name
            for name, c in components.items()
            if ".expert" in name
            and c["kind"] != "reused"
            and int(name.rsplit("expert", 1)[1]) >= root_experts
        ]
        rows.append(
            {
                "task": task,
                "params_added": sum(c["size"] for c in added),
                # Of those, the MoE blocks' (whole blocks, or their shared part and experts).
                "moe_params_added": sum(
                    c["size"]
                    for name, c in components.items()
                    if c["kind"] != "reused" and name.split(".")[0] in moe_blocks
                ),
                "accounted_params": record["accounted_params"],
                "test_accuracy": record["test_accuracy_when_added"],
                "experts_in_free_slots": len(in_free_slots),
                "moe_block_cloned": any(
                    components[b]["kind"] != "reused" for b in moe_blocks if b in components
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON result")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--slots", type=int, default=4, help="free expert slots per MoE block")
    parser.add_argument("--tasks", type=int, default=0, help="first N tasks (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)

    from absl import logging

    from multitask_moe.core import config_lib
    from multitask_moe.evolution import System
    from multitask_moe.evolve import settings_from_config

    logging.set_verbosity(logging.WARNING)
    modes = {"whole-block": 0, "experts": args.slots}
    runs: dict[str, list] = {mode: [] for mode in modes}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode, slots in modes.items():
            config = config_lib.sibling_config(os.path.join(REPO, "configs", "x.py"), "evolve")
            config_lib.set_from_strings(config, args.set)
            changes = {"seed": seed, "evolve.free_expert_slots": slots}
            if args.tasks:
                tasks = [t.strip() for t in config.evolve.tasks.split(",")][: args.tasks]
                changes["evolve.tasks"] = ", ".join(tasks)
            config = config_lib.set_fields(config, changes)
            start = time.perf_counter()
            system = System(settings_from_config(config))
            system.run()
            rows = task_rows(system, int(config.model.moe.num_experts))
            runs[mode].append({"seed": seed, "wall_s": time.perf_counter() - start, "tasks": rows})
            total = sum(r["params_added"] for r in rows)
            print(f"seed {seed} {mode:<12} {total:>8,} parameters added over {len(rows)} tasks")

    summary = {}
    for mode, seeds in runs.items():
        tasks = [r["task"] for r in seeds[0]["tasks"]]
        summary[mode] = {
            "params_added_per_task": {
                t: statistics.mean(s["tasks"][i]["params_added"] for s in seeds)
                for i, t in enumerate(tasks)
            },
            "params_added_total": statistics.mean(
                sum(r["params_added"] for r in s["tasks"]) for s in seeds
            ),
            "moe_params_added_total": statistics.mean(
                sum(r["moe_params_added"] for r in s["tasks"]) for s in seeds
            ),
            "params_added_after_the_first": statistics.mean(
                sum(r["params_added"] for r in s["tasks"][1:]) for s in seeds
            ),
            "mean_test_accuracy": statistics.mean(
                statistics.mean(r["test_accuracy"] for r in s["tasks"]) for s in seeds
            ),
            "experts_in_free_slots": sum(
                r["experts_in_free_slots"] for s in seeds for r in s["tasks"]
            ),
            "tasks_that_cloned_an_moe_block": sum(
                r["moe_block_cloned"] for s in seeds for r in s["tasks"]
            ),
        }
    whole, experts = summary["whole-block"], summary["experts"]
    print(f"\n{'task':<16}{'whole-block':>12}{'experts':>10}   (parameters added, mean)")
    for task, value in whole["params_added_per_task"].items():
        print(f"{task:<16}{value:>12,.0f}{experts['params_added_per_task'][task]:>10,.0f}")
    for mode in modes:
        s = summary[mode]
        print(
            f"{mode}: {s['params_added_total']:,.0f} added in all "
            f"({s['params_added_after_the_first']:,.0f} after the first task, "
            f"{s['moe_params_added_total']:,.0f} in MoE blocks), mean test "
            f"accuracy {s['mean_test_accuracy']:.3f}, {s['experts_in_free_slots']} experts in "
            f"free slots, {s['tasks_that_cloned_an_moe_block']} task paths with a cloned "
            "MoE block"
        )
    result = {"config": vars(args), "summary": summary, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
