"""The papers' claims reproduced at small scale (docs/experiments.md, docs/results.md).

    python -m multitask_moe.experiments                # every claim, 3 seeds: make reproduce
    python -m multitask_moe.experiments mi_loss --scale=quick

Each claim (`claims.CLAIMS`) measures a few numbers per seed from training runs
(`catalogue.RUNS`, each a config of configs/ run in this process and cached under the
workdir) and states the paper's direction as comparisons of those numbers
(`stats.Compare`); `report` writes the tables, verdicts and plots.
"""

from multitask_moe.experiments.claims import CLAIMS, Claim, Context
from multitask_moe.experiments.runs import Run, Runner
from multitask_moe.experiments.scale import SCALES, Scale

__all__ = ["CLAIMS", "SCALES", "Claim", "Context", "Run", "Runner", "Scale"]
