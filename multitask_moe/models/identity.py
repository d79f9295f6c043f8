"""What a sparse layer, an expert slot and an evolution component are called: typed
identities, each with one string form, the one that files, logs, metric names and
config keys use.

    SparseLayer(1, "moe")            "block1/moe"      block 1's MoE MLP (or "moa": its MoA)
    ComponentName("block", 1)        "block1"          transformer block 1 of a path
    ComponentName.expert_slot(1, 3)  "block1.expert3"  expert slot 3 of block 1's MoE
    ComponentName("adapter", 2)      "adapter2"        the adapter after block 2
    ComponentName("stem"), ComponentName("head"), ...   "stem", "head", ...

`parse` is the inverse of `str`; a text in neither form raises ValueError naming it and
the forms allowed. A leaf of a model's state is named by its key path (models/keys.py).
"""

from __future__ import annotations

import dataclasses
import re

SPARSE_KINDS = ("moe", "moa")
# Where each kind of sparse layer lives inside block i of a MultitaskTransformer.
_LAYER_PATHS = {"moe": ("mlp", "moe"), "moa": ("attention", "moa")}
_SPARSE_LAYER = re.compile(r"block(\d+)/(moe|moa)")


@dataclasses.dataclass(frozen=True, order=True)
class SparseLayer:
    """Block `block`'s MoE MLP (kind "moe") or MoA attention (kind "moa")."""

    block: int
    kind: str

    def __post_init__(self):
        if self.kind not in SPARSE_KINDS:
            raise ValueError(f"a sparse layer's kind is {self.kind!r}; allowed: {SPARSE_KINDS}")

    def __str__(self) -> str:
        return f"block{self.block}/{self.kind}"

    @classmethod
    def parse(cls, text: str) -> SparseLayer:
        match = _SPARSE_LAYER.fullmatch(str(text))
        if match is None:
            raise ValueError(
                f"{text!r} names no sparse layer; allowed: 'block<i>/moe', 'block<i>/moa'"
            )
        return cls(int(match[1]), match[2])

    @property
    def state_path(self) -> tuple[str | int, ...]:
        """The layer's path in the model's state: ("blocks", i, "mlp", "moe") for an MoE."""
        return ("blocks", self.block, *_LAYER_PATHS[self.kind])


# Components without an index, and those with one (a block's, an adapter's, a slot's).
WHOLE_KINDS = ("stem", "position_embedding", "final_norm", "head")
INDEXED_KINDS = ("block", "adapter", "expert")
_INDEXED = re.compile(r"(block|adapter)(\d+)|block(\d+)\.expert(\d+)")


@dataclasses.dataclass(frozen=True, order=True)
class ComponentName:
    """The name of a component's place in a muNet path (the pool's Component.name): its
    kind, the block it belongs to (blocks, adapters and expert slots) and, for an expert
    slot, the slot."""

    kind: str
    block: int | None = None
    slot: int | None = None

    def __post_init__(self):
        indexed = self.block is not None
        if self.kind not in WHOLE_KINDS + INDEXED_KINDS or indexed != (self.kind in INDEXED_KINDS):
            raise ValueError(
                f"no component kind {self.kind!r} with block {self.block}; allowed: "
                f"{WHOLE_KINDS} without a block, {INDEXED_KINDS} with one"
            )
        if (self.slot is not None) != (self.kind == "expert"):
            raise ValueError(f"an expert slot, and only one, has a slot: {self!r}")

    @classmethod
    def expert_slot(cls, block: int, slot: int) -> ComponentName:
        return cls("expert", block, slot)

    def __str__(self) -> str:
        if self.kind == "expert":
            return f"block{self.block}.expert{self.slot}"
        return self.kind if self.block is None else f"{self.kind}{self.block}"

    @classmethod
    def parse(cls, text: str) -> ComponentName:
        text = str(text)
        if text in WHOLE_KINDS:
            return cls(text)
        match = _INDEXED.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{text!r} names no component; allowed: {', '.join(WHOLE_KINDS)}, "
                "'block<i>', 'adapter<i>', 'block<i>.expert<k>'"
            )
        if match[1]:
            return cls(match[1], int(match[2]))
        return cls.expert_slot(int(match[3]), int(match[4]))

    @property
    def in_block(self) -> bool:
        """A transformer block or one of its expert slots (what the root can supply)."""
        return self.kind in ("block", "expert")
