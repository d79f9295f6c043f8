"""Which experts of a sparse layer a task keeps when it is extracted.

Token-dependent routing (Mod-Squad): expert e is kept when its share of the task's top-k
choices exceeds threshold / K percent (threshold 3 by default, so 1.5 % at K = 2); if
fewer than K pass, the K most used are kept. Task routing (Task-MoE): every token of the
task chooses the top-k of the task's routing row A[t], so exactly those K are kept and
the extracted layer computes what the full layer computes whenever nothing is dropped.

Shape legend: E experts of the layer, K top_k.
"""

from __future__ import annotations

import numpy as np

from multitask_moe.moe.usage import shares


def kept_experts(
    usage_row: np.ndarray | None,
    top_k: int,
    threshold: float,
    task_logits_row: np.ndarray | None = None,
) -> tuple[int, ...]:
    """Kept expert ids, increasing.

    usage_row [E]: the task's choice counts (usage EMA or counted on data); task_logits_row
    [E]: the task's routing row when the layer routes by task alone (then usage is not
    needed); threshold: percent, in (0, 100].
    """
    if task_logits_row is not None:
        order = np.argsort(-np.asarray(task_logits_row, np.float64), kind="stable")
        return tuple(sorted(int(e) for e in order[:top_k]))
    share = shares(np.asarray(usage_row, np.float64)[None])[0]  # [E] percent
    kept = np.flatnonzero(share > threshold / top_k)
    if len(kept) < top_k:
        kept = np.argsort(-share, kind="stable")[:top_k]
    return tuple(sorted(int(e) for e in kept))
