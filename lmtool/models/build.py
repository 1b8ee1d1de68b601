"""Build the causal LM from a composed config, through the model-family registry."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lmtool.models.lm import CausalLM
from lmtool.models.registry import RUNTIME_KEYS, get_family


def build_model(cfg: Any, vocab_size: int) -> CausalLM:
    """The LM of `cfg` with the token mixers of its model family (`cfg.model.name`)."""
    m = cfg.model
    return CausalLM(
        vocab_size,
        get_family(m.name).build(cfg),
        n_layer=m.n_layer,
        d_model=m.d_model,
        d_inner=m.d_inner,
        dropout=m.dropout,
        pre_lnorm=m.pre_lnorm,
        tie_weight=m.tie_weight,
        pos_emb=m.pos_emb,
        init_std=m.init_std,
        proj_init_std=m.proj_init_std,
        adaptive=m.adaptive,
        cutoffs=list(m.cutoffs),
        div_val=m.div_val,
        tie_projs=m.tie_projs,
        carry_over=m.carry_over,
    )


def model_signature(cfg: Any) -> dict:
    """The config parts that fix the parameter shapes and semantics; a checkpoint is only loaded into a
    model whose signature matches."""
    family = get_family(cfg.model.name)
    sig = {"model": OmegaConf.to_container(cfg.model, resolve=True)}
    for key in (*RUNTIME_KEYS, *family.runtime_keys):
        sig["model"].pop(key, None)
    for group in family.groups:
        sig[group] = {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if k != "impl"}
    return sig
