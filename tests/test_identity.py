"""The typed identities of a sparse layer, an expert slot and a component: one string form
each, parse inverse of str, bad text named; the names a path model uses."""

import pytest

from multitask_moe import models
from multitask_moe.evolution import path_model
from multitask_moe.models import ComponentName, SparseLayer


@pytest.mark.parametrize(
    ("identity", "text"),
    [
        (SparseLayer(1, "moe"), "block1/moe"),
        (SparseLayer(12, "moa"), "block12/moa"),
        (ComponentName("block", 3), "block3"),
        (ComponentName.expert_slot(1, 4), "block1.expert4"),
        (ComponentName("adapter", 0), "adapter0"),
        (ComponentName("position_embedding"), "position_embedding"),
        (ComponentName("head"), "head"),
    ],
)
def test_one_string_form_each_and_parse_inverts_it(identity, text):
    assert str(identity) == text
    assert type(identity).parse(text) == identity


@pytest.mark.parametrize(
    ("kind", "text", "match"),
    [
        (SparseLayer, "block1/mlp", r"'block1/mlp' names no sparse layer; allowed: 'block<i>/moe'"),
        (SparseLayer, "block/moe", "names no sparse layer"),
        (ComponentName, "block1.expert", r"'block1.expert' names no component; allowed: stem"),
        (ComponentName, "adapter", "names no component"),
        (ComponentName, "head1", "names no component"),
    ],
)
def test_bad_text_is_named_with_the_forms_allowed(kind, text, match):
    with pytest.raises(ValueError, match=match):
        kind.parse(text)


def test_impossible_identities_are_refused():
    with pytest.raises(ValueError, match="a sparse layer's kind is 'mlp'"):
        SparseLayer(0, "mlp")
    with pytest.raises(ValueError, match="no component kind 'block' with block None"):
        ComponentName("block")
    with pytest.raises(ValueError, match="an expert slot, and only one, has a slot"):
        ComponentName("block", 1, slot=2)


def test_a_path_models_component_names_and_the_layer_paths_of_a_model():
    arch = path_model.Architecture(
        depth=2,
        adapters=((0, 8),),
        num_classes=3,
        modality="tabular",
        expert_slots=4,
        experts=((1, (0, 2)),),
    )
    assert arch.component_names() == (
        "stem", "position_embedding", "block0", "adapter0", "block1", "block1.expert0",
        "block1.expert2", "final_norm", "head",
    )  # fmt: skip
    assert path_model.component_of(("blocks", 1, "mlp", "moe", "router")) == "block1"
    assert path_model.component_of(("adapters", "0", "down", "kernel")) == "adapter0"
    assert path_model.component_of(("task_loss_scale",)) == "head"
    assert SparseLayer.parse("block1/moe").state_path == ("blocks", 1, "mlp", "moe")
    assert SparseLayer(2, "moa").state_path == ("blocks", 2, "attention", "moa")
    assert models.SparseLayer is SparseLayer
