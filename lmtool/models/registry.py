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
from lmtool.layers.deep_fwp import DeltaDelta, DeltaMLPConfig, build_delta_mlp
from lmtool.layers.fast_weight import FastWeightModelConfig, build_fast_weight, validate_fast_weight_config
from lmtool.layers.lstm import LSTMConfig, build_lstm, check_lstm
from lmtool.layers.mixer import ModelConfig, TokenMixer
from lmtool.layers.recurrent_fwp import (
    DeltaLSTM,
    DeltaRNN,
    RecurrentDeltaNet,
    RecurrentFWPConfig,
    builder,
    check_recurrent_fwp,
)
from lmtool.layers.relative_attention import TransformerXLConfig, build_transformer_xl, check_transformer_xl
from lmtool.layers.srwm import SRWMConfig, build_srwm, check_srwm

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
register(ModelFamily("delta_mlp", DeltaMLPConfig, build_delta_mlp, check=check_recurrent_fwp))
register(ModelFamily("delta_delta", RecurrentFWPConfig, builder(DeltaDelta), check=check_recurrent_fwp))
register(ModelFamily("delta_rnn", RecurrentFWPConfig, builder(DeltaRNN), check=check_recurrent_fwp))
register(ModelFamily("delta_lstm", RecurrentFWPConfig, builder(DeltaLSTM), check=check_recurrent_fwp))
register(ModelFamily("rec_delta", RecurrentFWPConfig, builder(RecurrentDeltaNet), check=check_recurrent_fwp))
register(ModelFamily("srwm", SRWMConfig, build_srwm, check=check_srwm))
register(ModelFamily("lstm", LSTMConfig, build_lstm, check=check_lstm))
