"""The one registry of model families: a model name -> its config schema, its mixer builder, its checks.

Adding a model family = its layer file (a `TokenMixer` subclass, a schema extending `ModelConfig`, a builder
`cfg -> layer index -> mixer`), its YAML `conf/model/<name>.yaml` (whose defaults list names the schema
`<name>_schema`), and one `register(...)` line at the bottom of this file. Nothing else lists model names:
config validation, model building and checkpoint signatures all ask this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmtool.layers.attention import TransformerConfig, build_transformer
from lmtool.layers.fast_weight import FastWeightModelConfig, build_fast_weight, validate_fast_weight_config
from lmtool.layers.mixer import ModelConfig, TokenMixer
from lmtool.layers.relative_attention import TransformerXLConfig, build_transformer_xl, check_transformer_xl

# model keys that never change what a checkpoint's weights mean: free to differ on resume or evaluation
RUNTIME_KEYS = ("dropout", "dropatt", "init_std", "proj_init_std", "carry_over")


@dataclass(frozen=True)
class ModelFamily:
    """One model family. `schema` types `cfg.model`; `build(cfg)` returns `layer index -> token mixer`;
    `groups` are the other config groups that configure the mixer (part of the checkpoint signature);
    `runtime_keys` are model keys that may change at evaluation (e.g. a memory length); `check(cfg)`
    returns why a composed config cannot be built, or None."""

    name: str
    schema: type[ModelConfig]
    build: Callable[[Any], Callable[[int], TokenMixer]]
    groups: tuple[str, ...] = ()
    runtime_keys: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> None:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family


def get_family(name: str) -> ModelFamily:
    """The family registered as `name`; ValueError listing the known names otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"model.name={name} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


MEMORY_KEYS = ("mem_len", "same_length", "clamp_len")

register(ModelFamily("transformer", TransformerConfig, build_transformer, runtime_keys=MEMORY_KEYS))
register(ModelFamily("transformer_xl", TransformerXLConfig, build_transformer_xl, runtime_keys=MEMORY_KEYS,
                     check=check_transformer_xl))  # fmt: skip
register(ModelFamily("fwm", FastWeightModelConfig, build_fast_weight, ("update_rule", "feature_map"),
                     check=validate_fast_weight_config))  # fmt: skip
