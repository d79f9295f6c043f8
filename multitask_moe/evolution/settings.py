"""The settings of an evolution run (configs/evolve.py builds them from a config) and the
ladders its hyperparameter mutations climb; `Settings.check` refuses what cannot run
with one line (ConfigError) naming the value and what is allowed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import ml_collections

from multitask_moe.errors import ConfigError, check_int
from multitask_moe.evolution import mutation
from multitask_moe.evolution.paths import check_size_scale

# Ordered ladders of the mutable hyperparameters (one rung per mutation).
LADDERS = {
    "mu": mutation.MU_LADDER,
    "learning_rate": (3e-4, 1e-3, 3e-3, 1e-2),
    "adapter_size": (8, 16, 32, 64),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """An evolution run (configs/evolve.py builds one from a config)."""

    tasks: tuple[str, ...]
    model: ml_collections.ConfigDict  # the model section of a training config (the root)
    generations: int = 2
    children: int = 2  # per generation
    steps: int = 100  # train steps per child
    validations: int = 4  # per child; the best one counts
    batch_size: int = 32
    eval_batch_size: int = 128
    size_scale: float = 1.0  # s in q * s ** (P / P_root)
    weight_decay: float = 1e-4
    aux_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    image_size: int = 8
    patch_size: int = 2
    data_dir: str | None = None
    seed: int = 0
    # Free expert slots of every MoE block beyond the root's experts: 0 keeps an MoE block
    # one component; more makes each expert a component that a child may clone alone
    # into a free slot (path_model.py).
    free_expert_slots: int = 0
    # Devices each child trains on: 1 trains one child per device; n > 1 one child per
    # group of n devices, over which its MoE and MoA layers run expert-parallel (experts
    # split n ways, the batch too; a dense model is data-parallel there), so a generation
    # trains devices // n children at once.
    devices_per_child: int = 1
    # The root path's hyperparameters, each on its ladder (LADDERS).
    mu: float = 0.2
    learning_rate: float = 3e-3
    adapter_size: int = 16

    def check(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks is empty; give at least one task to introduce")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ConfigError(f"tasks {repeated} appear twice; each task is introduced once")
        check_size_scale(self.size_scale)
        if not 0 <= self.mu <= 1:
            raise ConfigError(f"mu={self.mu} must be in [0, 1] (a mutation probability)")
        for name in LADDERS:
            mutation.check_ladder(name, getattr(self, name), LADDERS[name])
        slots = check_int(self.free_expert_slots, "free_expert_slots", 0, error=ConfigError)
        if slots and not self.model.moe_every:
            raise ConfigError(
                f"free_expert_slots={slots} needs MoE blocks; this model has none (moe_every=0)"
            )
        for name in ("generations", "children", "steps", "validations", "batch_size"):
            check_int(getattr(self, name), name, 1, error=ConfigError)
        self._check_devices_per_child()

    def _check_devices_per_child(self) -> None:
        """devices_per_child divides what it splits: the devices into groups, a child's
        experts (its slots) and its batches."""
        n = check_int(self.devices_per_child, "devices_per_child", 1, error=ConfigError)
        if n == 1:  # nothing to split; and JAX need not start for a check
            return
        devices = jax.device_count()
        if n > devices:
            raise ConfigError(f"devices_per_child={n} must be in [1, {devices}] (devices)")
        if devices % n:
            raise ConfigError(
                f"devices_per_child={n} does not divide the {devices} devices into groups"
            )
        sizes = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        if self.model.moe_every:
            sizes["moe.num_experts + free_expert_slots"] = (
                int(self.model.moe.num_experts) + self.free_expert_slots
            )
        if self.model.get("moa_every"):
            sizes["moa.num_experts"] = int(self.model.moa.num_experts)
        for name, size in sizes.items():
            if size % n:
                raise ConfigError(
                    f"devices_per_child={n} does not divide {name}={size}; a child splits "
                    "its experts and its batches over its devices"
                )
