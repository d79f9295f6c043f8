"""What an evolution run shows: evolution.json, the per-task table and the system picture."""

from __future__ import annotations

import numpy as np

from multitask_moe.evolution.system import System

KIND_CODE = {"new": 1, "cloned": 2, "reused": 3}


def summary(system: System, baseline: dict | None = None) -> dict:
    """The contents of evolution.json."""
    return {
        "tasks": list(system.settings.tasks),
        "finished": list(system.best),
        "root_params": system.root_params,
        "size_scale": system.settings.size_scale,
        "per_task": system.records,
        "progress": {k: v for k, v in system.progress.items() if k != "population"},
        "components_alive": len(system.pool),
        "baseline": baseline or {},
    }


def table(system: System, baseline: dict | None = None) -> str:
    """Per finished task: accuracy when added and now, parameters, reuse."""
    baseline = baseline or {}
    head = (
        f"{'task':<16}{'test acc':>9}{'now':>7}{'params':>10}{'reused':>8}{'cloned':>8}{'new':>5}"
    )
    if baseline:
        head += f"{'fine-tune acc':>15}{'params':>10}"
    lines = [head, "-" * len(head)]
    for task, record in system.records.items():
        kinds = [c["kind"] for c in record["components"].values()]
        line = (
            f"{task:<16}{record['test_accuracy_when_added']:>9.3f}"
            f"{record.get('test_accuracy_now', record['test_accuracy_when_added']):>7.3f}"
            f"{record['accounted_params']:>10,.0f}{kinds.count('reused'):>8}"
            f"{kinds.count('cloned'):>8}{kinds.count('new'):>5}"
        )
        if task in baseline:
            line += f"{baseline[task]['test_accuracy']:>15.3f}{baseline[task]['params']:>10,.0f}"
        lines.append(line)
    return "\n".join(lines)


def picture(system: System, path: str) -> None:
    """Tasks x components: which component each task's path uses, and how it got it
    (new, cloned, reused); a column shared by several rows is a shared component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    tasks = list(system.records)
    ids = sorted({c["id"] for r in system.records.values() for c in r["components"].values()})
    grid = np.zeros((len(tasks), len(ids)))
    for row, task in enumerate(tasks):
        for entry in system.records[task]["components"].values():
            grid[row, ids.index(entry["id"])] = KIND_CODE[entry["kind"]]
    names = {cid: system.pool[cid].name for cid in ids if cid in system.pool}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(ids)), 1 + 0.5 * len(tasks)))
    colors = ListedColormap(["white", "tab:green", "tab:orange", "tab:blue"])
    ax.imshow(grid, cmap=colors, vmin=0, vmax=3, aspect="auto")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(len(ids)), [f"{names.get(c, '?')}#{c}" for c in ids], rotation=90)
    ax.set_title("components per task: green new, orange cloned, blue reused (locked)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
