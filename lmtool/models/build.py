"""Build the causal LM from a composed config: the only place that maps config names to modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmtool.layers.attention import SoftmaxAttention
from lmtool.models.lm import CausalLM


def make_mixer_factory(cfg: Any):
    """Return `layer_index -> token mixer` for `cfg.model.name`."""
    m = cfg.model
    if m.name == "transformer":
        return lambda i: SoftmaxAttention(
            m.d_model, m.n_head, m.d_head, m.dropout, m.dropatt, mem_len=m.mem_len, same_length=m.same_length
        )
    if m.name == "transformer_xl":
        from lmtool.layers.relative_attention import RelativeAttention, RelativeBiases

        shared = None if m.untie_r else RelativeBiases(m.n_head, m.d_head)  # Transformer-XL's default

        def make_xl(i: int) -> nn.Module:
            return RelativeAttention(
                m.d_model,
                m.n_head,
                m.d_head,
                m.dropout,
                m.dropatt,
                biases=shared if shared is not None else RelativeBiases(m.n_head, m.d_head),
                mem_len=m.mem_len,
                same_length=m.same_length,
                clamp_len=m.clamp_len,
            )

        return make_xl
    if m.name == "fwm":
        from lmtool.layers.fast_weight import FastWeightAttention
        from lmtool.layers.feature_maps import make_feature_map

        rule, fmap = cfg.update_rule, cfg.feature_map

        def make(i: int) -> nn.Module:
            phi = make_feature_map(
                fmap.name,
                m.d_head,
                nu=fmap.nu,
                n_features=fmap.n_features,
                redraw=fmap.redraw,
                redraw_interval=fmap.redraw_interval,
            )
            return FastWeightAttention(
                m.d_model,
                m.n_head,
                m.d_head,
                m.dropout,
                update_rule=rule.name,
                feature_map=phi,
                qk_norm=rule.qk_norm,
                attn_norm=rule.attn_norm,
                normalized_retrieval=rule.normalized_retrieval,
                eps=rule.eps,
                impl=rule.impl,
            )

        return make
    raise ValueError(f"unknown model.name={m.name}")


def build_model(cfg: Any, vocab_size: int) -> CausalLM:
    m = cfg.model
    return CausalLM(
        vocab_size,
        make_mixer_factory(cfg),
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
    from omegaconf import OmegaConf

    sig = {"model": OmegaConf.to_container(cfg.model, resolve=True)}
    # training- and evaluation-time knobs, free to change on resume or evaluation
    for key in ("dropout", "dropatt", "init_std", "proj_init_std", "carry_over", "mem_len", "same_length",
                "clamp_len"):
        sig["model"].pop(key, None)
    if cfg.model.name == "fwm":
        sig["update_rule"] = {k: v for k, v in cfg.update_rule.items() if k != "impl"}
        sig["feature_map"] = dict(cfg.feature_map)
    return sig
