"""Sparse mixture-of-experts layers: routing, dispatch plans, experts, losses, MoE, MoA."""

from multitask_moe.moe.attention import MoA, MoASettings
from multitask_moe.moe.experts import Experts
from multitask_moe.moe.layer import MoE, MoESettings
from multitask_moe.moe.losses import aux_from_stats, mutual_info_loss, router_stats
from multitask_moe.moe.plan import Plan
from multitask_moe.moe.routing import ROUTING_KINDS, Router

__all__ = [
    "MoE",
    "MoA",
    "MoESettings",
    "MoASettings",
    "Experts",
    "Router",
    "Plan",
    "ROUTING_KINDS",
    "aux_from_stats",
    "mutual_info_loss",
    "router_stats",
]
