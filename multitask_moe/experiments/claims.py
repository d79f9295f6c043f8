"""The eight claims in report order (docs/results.md is written from these): claims
1-4 in task_claims, 5, 6 and 8 in expert_claims, 7 in evolution_claim."""

from __future__ import annotations

from multitask_moe.experiments.claim import Claim, Context
from multitask_moe.experiments.evolution_claim import EVOLUTION
from multitask_moe.experiments.expert_claims import EXTRACTION, INFERENCE, MI_LOSS
from multitask_moe.experiments.task_claims import (
    LOW_RESOURCE_CLAIM,
    TASK_MOE,
    UNRELATED,
    UNSEEN,
)

CLAIMS = {
    claim.name: claim
    for claim in (
        TASK_MOE,
        LOW_RESOURCE_CLAIM,
        UNSEEN,
        UNRELATED,
        MI_LOSS,
        EXTRACTION,
        EVOLUTION,
        INFERENCE,
    )
}

__all__ = ["CLAIMS", "LOW_RESOURCE_CLAIM", "Claim", "Context"]
