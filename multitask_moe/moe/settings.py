"""Layer settings: one frozen dataclass per layer kind, made from the layer's constructor.

    MoESettings = settings_class(MoE)        # beside the layer, in moe/layer.py
    settings = MoESettings.from_mapping(config.model.moe)
    layer = MoE(d_model, num_tasks=T, rngs=rngs, **settings.layer_kwargs())

A layer's options are written once, as the keyword arguments of its __init__ with their
defaults; the settings class has one field per option with the same name, annotation and
default, so adding an option to a layer is one edit and no default can disagree between a
config and the layer. The arguments a model supplies itself (MODEL_ARGS: the model width,
its task count, dtypes, mode and rngs) are not settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from typing import Any

MODEL_ARGS = frozenset(
    {"self", "d_model", "num_tasks", "dtype", "param_dtype", "deterministic", "rngs"}
)


def settings_class(layer: type) -> type:
    """A frozen dataclass `<Layer>Settings` of `layer`'s constructor options."""
    hints = typing.get_type_hints(layer.__init__)
    fields = []
    for name, parameter in inspect.signature(layer.__init__).parameters.items():
        if name in MODEL_ARGS or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        kind = hints.get(name, Any)
        if parameter.default is inspect.Parameter.empty:
            fields.append((name, kind))
        else:
            fields.append((name, kind, dataclasses.field(default=parameter.default)))
    namespace = {
        "from_mapping": classmethod(_from_mapping),
        "layer_kwargs": _layer_kwargs,
        "updated": _updated,
        "__doc__": f"The options of `{layer.__name__}` (its constructor's keyword arguments "
        "except the ones the model supplies), with the layer's defaults.",
        "__module__": layer.__module__,
    }
    return dataclasses.make_dataclass(
        f"{layer.__name__}Settings", fields, frozen=True, namespace=namespace
    )


def _from_mapping(cls, values: Mapping[str, Any]):
    """Settings from a mapping keyed by field name (a ConfigDict section or a dict).

    Raises ValueError naming an unknown key and the allowed keys, or a missing required one.
    """
    values = dict(values.items())
    allowed = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; allowed: {allowed}")
    missing = [
        field.name
        for field in dataclasses.fields(cls)
        if field.name not in values
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{cls.__name__} needs {missing}; allowed keys: {allowed}")
    return cls(**values)


def _layer_kwargs(self) -> dict[str, Any]:
    """The layer's keyword arguments (every field, by name)."""
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def _updated(self, values: Mapping[str, Any]):
    """These settings with the fields in `values` replaced (checked like from_mapping)."""
    return type(self).from_mapping({**self.layer_kwargs(), **dict(values.items())})
