"""docs/config.md's field tables are what tools/config_reference.py makes of today's base
config: every field, its default, a meaning."""

from __future__ import annotations

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import config_reference  # noqa: E402

from multitask_moe.core import config_lib  # noqa: E402


def test_config_reference_is_current():
    current = (REPO / "docs" / "config.md").read_text()
    assert config_reference.rendered(current) == current, (
        "docs/config.md is stale: run .venv/bin/python tools/config_reference.py"
    )


def test_every_field_has_its_default_and_a_meaning():
    rows = config_reference.rows()
    flat = config_reference._flat(config_lib.base_config().to_dict())
    assert sorted(key for key, _, _ in rows) == sorted(flat)
    for key, default, meaning in rows:
        assert default == flat[key]
        assert len(meaning) > 10, f"{key} has no meaning: comment it in config_lib.base_config"


def test_comment_blocks_describe_the_fields_below_them():
    meanings = config_reference.source_meanings()
    assert meanings["data.min_tokens"] == meanings["data.min_token_width"]
    assert meanings["data.min_tokens"].startswith("Pad examples to at least")
    assert meanings["data.rate"].startswith("sampling rates")  # not data.tasks' block
    assert meanings["batch_size"] == "global, over all processes and devices"


def test_docstring_arguments_are_read_with_continuations():
    from multitask_moe import MoA, MoE

    moe = config_reference.docstring_meanings(MoE)
    assert moe["top_k"] == moe["num_experts"] and moe["top_k"].endswith("of them).")
    moa = config_reference.docstring_meanings(MoA, moe)
    assert moa["usage_ema_decay"] == moe["usage_ema_decay"]  # "as for the MoE layer"
