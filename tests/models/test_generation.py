"""Cached decoding equals its reference for every model family; sampling is seeded and filters exactly."""

from __future__ import annotations

import pytest
import torch

from lmtool.models.build import build_model
from lmtool.models.generation import (
    CachedDecoder,
    Context,
    default_context,
    filter_scores,
    generate,
    reference_scores,
)
from tests.helpers import compose_config

VOCAB = 41
PROMPT, STEPS = 5, 11  # window 8 below: decoding runs inside the window, then slides past it


def tiny(*overrides: str):
    """A smoke-size model; the paper's fast weight layer (`model=fwm`) unless the overrides name a model."""
    torch.manual_seed(0)
    family = () if any(o.startswith("model=") for o in overrides) else ("model=fwm",)
    cfg = compose_config("debug=smoke", "model.dropout=0", *family, *overrides)
    return build_model(cfg, VOCAB).double().eval()


FAST_WEIGHTS = {
    f"{rule}-{fmap}": (f"update_rule={rule}", f"feature_map={fmap}", "feature_map.redraw=fixed")
    for rule in ("sum", "delta")
    for fmap in ("elu", "favor", "dpfp")
}
CARRIED = ("model.carry_over=true", "model.pos_emb=false")
# DeltaNet's layer (short convolution with SiLU, L2-normalised q/k, head RMSNorm, output gate), DeltaProduct
DELTANET = ("feature_map=identity", "update_rule.qk_norm=l2", "model.short_conv=4", "model.head_norm=true",
            "model.output_gate=true")  # fmt: skip
PRODUCT = ("update_rule=delta_product", "feature_map=silu", "model.short_conv=3", "update_rule.allow_neg_eigval=true")
# Gated DeltaNet's layer (DeltaNet's plus the decay gate), the gated sum rule, a decaying DeltaProduct
GATED = ("update_rule=gated_delta", "feature_map=identity", "model.short_conv=4", "model.head_norm=true",
         "model.output_gate=true")  # fmt: skip

# (overrides, context) pairs: every family with the contexts it defines
CASES = {
    **{f"fwm-{name}-carried": ((*o, *CARRIED), Context("unbounded")) for name, o in FAST_WEIGHTS.items()},
    **{f"fwm-{name}-window": (o, Context("window", 8)) for name, o in FAST_WEIGHTS.items()},
    "fwm-positions-unbounded": (("update_rule=delta",), Context("unbounded")),
    "fwm-normalized-retrieval": (("update_rule.normalized_retrieval=true", *CARRIED), Context("unbounded")),
    "fwm-deltanet-carried": (DELTANET + CARRIED, Context("unbounded")),
    "fwm-deltanet-window": (DELTANET, Context("window", 8)),
    "fwm-delta-product-carried": (PRODUCT + CARRIED, Context("unbounded")),
    "fwm-delta-product-window": (PRODUCT, Context("window", 8)),
    "fwm-gated-deltanet-carried": (GATED + CARRIED, Context("unbounded")),
    "fwm-gated-deltanet-window": (GATED, Context("window", 8)),
    "fwm-gated-sum-carried": (("update_rule=gated_sum", "feature_map=identity", *CARRIED), Context("unbounded")),
    "fwm-gated-delta-product-carried": ((*PRODUCT, "update_rule.decay=true", *CARRIED), Context("unbounded")),
    "transformer-window": (("model=transformer",), Context("window", 8)),
    "transformer-unbounded": (("model=transformer",), Context("unbounded")),
    "transformer-memory": (("model=transformer", "model.mem_len=6"), Context("memory", 4)),
    "xl-memory": (("model=transformer_xl", "model.mem_len=6"), Context("memory", 4)),
    "xl-memory-preLN": (("model=transformer_xl", "model.mem_len=6", "model.pre_lnorm=true"), Context("memory", 3)),
    # recurrent fast weight programmers, the SRWM and the LSTM: their whole state (fast matrices, recurrent output,
    # cell) carried token by token
    **{f"{name}-carried": ((f"model={name}", *CARRIED), Context("unbounded"))
       for name in ("delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rec_delta", "srwm", "lstm")},
    "delta_mlp-depth2-window": (("model=delta_mlp", "model.fast_net_depth=2"), Context("window", 8)),
    "delta_lstm-preLN-window": (("model=delta_lstm", "model.pre_lnorm=true"), Context("window", 8)),
}


def decode_both(model, context: Context):
    """Feed a fixed token sequence one token at a time; the cached scores and the reference scores per step."""
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, PROMPT + STEPS))
    decoder = CachedDecoder(model, context, batch_size=2)
    cached = [decoder.feed(tokens[:, :PROMPT])]
    cached += [decoder.feed(tokens[:, t : t + 1]) for t in range(PROMPT, tokens.shape[1] - 1)]
    with torch.no_grad():
        reference = [reference_scores(model, tokens[:, :t], PROMPT, context) for t in range(PROMPT, tokens.shape[1])]
    return torch.stack(cached, 1), torch.stack(reference, 1), tokens


@pytest.mark.parametrize("overrides,context", CASES.values(), ids=CASES.keys())
def test_cached_decoding_equals_the_reference(overrides, context):
    """One token at a time with the cached state gives the reference's scores at every step (float64)."""
    model = tiny(*overrides)
    with torch.no_grad():
        cached, reference, _ = decode_both(model, context)
    torch.testing.assert_close(cached, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides", [("model=transformer_xl",), ("model=transformer",)], ids=["xl", "transformer"])
def test_memory_as_long_as_the_sequence_equals_one_full_pass(overrides):
    """With mem_len >= the whole sequence, the memory recurrence scores each step as one pass over all tokens."""
    model = tiny(*overrides, f"model.mem_len={PROMPT + STEPS}")
    with torch.no_grad():
        cached, _, tokens = decode_both(model, Context("memory", 3))
        full, _ = model(tokens[:, :-1])
    torch.testing.assert_close(cached, full[:, PROMPT - 1 :], rtol=1e-9, atol=1e-9)


def test_unbounded_cache_equals_one_full_pass_with_positions():
    """Decoding with absolute positions continues them: the KV-cached transformer matches one full pass."""
    model = tiny("model=transformer")
    with torch.no_grad():
        cached, _, tokens = decode_both(model, Context("unbounded"))
        full, _ = model(tokens[:, :-1])
    torch.testing.assert_close(cached, full[:, PROMPT - 1 :], rtol=1e-9, atol=1e-9)


def test_fast_weight_state_has_a_fixed_size():
    """The fast-weight state after many decoded tokens has the shape of the state after one."""
    model = tiny(*CARRIED)
    decoder = CachedDecoder(model, Context("unbounded"), batch_size=1)
    with torch.no_grad():
        decoder.feed(torch.zeros(1, 1, dtype=torch.long))
        shapes = [tuple(t.shape) for layer in decoder.state.layers for t in layer if t is not None]
        for _ in range(50):
            decoder.feed(torch.ones(1, 1, dtype=torch.long))
    assert [tuple(t.shape) for layer in decoder.state.layers for t in layer if t is not None] == shapes
    assert decoder.state.seen == 51


@pytest.mark.parametrize("overrides,context", CASES.values(), ids=CASES.keys())
def test_greedy_cached_and_uncached_give_the_same_tokens(overrides, context):
    """temperature 0: cached decoding prints exactly the tokens of the from-scratch reference."""
    model = tiny(*overrides).float()
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    a = generate(model, prompt, max_new_tokens=12, context=context, temperature=0.0)
    b = generate(model, prompt, max_new_tokens=12, context=context, temperature=0.0, cache=False)
    assert torch.equal(a, b)


def test_seeded_sampling_is_reproducible():
    """The same seed gives the same samples; another seed gives others."""
    model = tiny()
    prompt = torch.randint(0, VOCAB, (2, 4))

    def draw(seed):
        return generate(model, prompt, max_new_tokens=20, context=Context("window", 16),
                        generator=torch.Generator().manual_seed(seed), top_k=10, top_p=0.9)  # fmt: skip

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_top_k_keeps_exactly_the_k_best():
    """top_k leaves the k highest scores untouched and sets the rest to -inf."""
    scores = torch.randn(3, 50, dtype=torch.float64)
    filtered = filter_scores(scores, top_k=7)
    kept = torch.isfinite(filtered)
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(filtered[kept], scores[kept])
    assert (scores[kept].view(3, 7).min(-1).values >= scores.masked_fill(kept, float("-inf")).max(-1).values).all()


def test_top_p_keeps_the_smallest_nucleus():
    """top_p keeps the most likely tokens until their probability first reaches p, and no others."""
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.15, 0.1]], dtype=torch.float64)
    cases = [(0.45, [1]), (0.6, [1, 2]), (0.69, [1, 2]), (0.71, [1, 2, 3]), (0.9, [1, 2, 3, 4]), (1.0, [0, 1, 2, 3, 4])]
    for p, expected in cases:
        kept = torch.isfinite(filter_scores(probs.log(), top_p=p))[0].nonzero().flatten().tolist()
        assert kept == expected, p
    one = filter_scores(probs.log(), top_p=1e-9)
    assert torch.isfinite(one).sum() == 1 and torch.isfinite(one[0, 1])


def test_default_context_follows_how_the_model_was_trained():
    """Memory models use their memory; carried fast weights the whole history; the others their window."""
    assert default_context(tiny("model=transformer_xl"), 16) == Context("memory", 16)
    assert default_context(tiny(*CARRIED), 16) == Context("unbounded")
    assert default_context(tiny(), 16) == Context("window", 16)
    assert default_context(tiny(), 16, max_context=0) == Context("unbounded")
    assert default_context(tiny("model=transformer"), 16, max_context=100) == Context("window", 100)
    with pytest.raises(ValueError, match="memory"):
        default_context(tiny("model=transformer_xl"), 16, max_context=8)
