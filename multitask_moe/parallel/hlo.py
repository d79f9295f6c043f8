"""Reading collectives out of compiled HLO text (jax.jit(f).lower(...).compile().as_text()).

Used by the tests (exactly two all-to-alls per MoE layer, no all-gather of expert
weights) and by benchmarks/expert_parallel.py (bytes moved vs the minimum).
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_BYTES = {
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "s8": 1,
    "u8": 1,
    "pred": 1,
}
# `%name = <result type> op-name(` ; async pairs appear as op-name-start / op-name-done.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s(?P<op>[a-z\-]+)\(")
_ARRAY_TYPE = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def _instructions(hlo_text: str):
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            yield match.group("op"), match.group("type"), line


def _op_name(op: str) -> str:
    """all-to-all-start -> all-to-all; the -done half of an async pair is not counted."""
    return op.removesuffix("-start")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many instructions of each collective kind the program runs (per device)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for op, _, _ in _instructions(hlo_text):
        name = _op_name(op)
        if name in counts and not op.endswith("-done"):
            counts[name] += 1
    return counts


def result_bytes(type_text: str) -> int:
    """Bytes of an HLO result type: one array `f32[2,3]{1,0}` or a tuple of them."""
    total = 0
    for match in _ARRAY_TYPE.finditer(type_text):
        dtype = match.group("dtype")
        if dtype not in _BYTES:
            continue
        dims = [int(d) for d in match.group("dims").split(",") if d]
        total += _BYTES[dtype] * math.prod(dims)
    return total


def collective_bytes(hlo_text: str, kind: str) -> list[int]:
    """Per-device result bytes of every `kind` collective (e.g. "all-to-all"), in order.

    For an all-to-all the result is as large as its input: what one device sends (its own
    chunk included, which stays in place).
    """
    return [
        result_bytes(type_text)
        for op, type_text, _ in _instructions(hlo_text)
        if _op_name(op) == kind and not op.endswith("-done")
    ]


def collective_lines(hlo_text: str, kind: str) -> list[str]:
    """The instruction lines of every `kind` collective (for error messages)."""
    return [
        line.strip()
        for op, _, line in _instructions(hlo_text)
        if _op_name(op) == kind and not op.endswith("-done")
    ]
