"""Segment memory (Transformer-XL recurrence), adaptive softmax in the LM, and the original toolkit's parameter
count."""

from __future__ import annotations

import pytest
import torch

from lmtool.models.build import build_model, model_signature
from lmtool.train.loop import evaluate
from tests.helpers import compose_config

MEMORY_MODELS = {
    "xl-postLN": ("model=transformer_xl",),
    "xl-preLN": ("model=transformer_xl", "model.pre_lnorm=true"),
    "transformer": ("model=transformer",),
}


def tiny(*overrides: str, vocab: int = 37) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = compose_config("debug=smoke", "model.dropout=0", *overrides)
    return build_model(cfg, vocab).double().eval()


def run_segments(model, inp, seg_len):
    """Score `inp` segment by segment, carrying each layer's memory; returns the outputs and the states."""
    outs, state, states = [], None, []
    with torch.no_grad():
        for start in range(0, inp.shape[1], seg_len):
            out, state = model(inp[:, start : start + seg_len], state=state, return_state=True)
            outs.append(out)
            states.append(state)
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("overrides", MEMORY_MODELS.values(), ids=MEMORY_MODELS.keys())
def test_segments_with_memory_equal_one_long_pass(overrides):
    """With mem_len >= the context, three segments with memory score every token as one pass over all of them."""
    model = tiny(*overrides, "model.mem_len=8")
    inp = torch.randint(0, 37, (2, 12))
    segmented, states = run_segments(model, inp, 4)
    with torch.no_grad():
        full, _ = model(inp)
    torch.testing.assert_close(segmented, full)
    assert [s.layers[0].shape[1] for s in states] == [4, 8, 8]  # memory grows to mem_len, then rolls


def test_rolled_memory_of_a_one_layer_xl_equals_a_pass_over_the_window():
    """Once the memory rolls, a one-layer Transformer-XL scores a segment as one pass over memory + segment."""
    model = tiny("model=transformer_xl", "model.n_layer=1", "model.mem_len=4")
    inp = torch.randint(0, 37, (2, 12))
    segmented, states = run_segments(model, inp, 4)
    with torch.no_grad():
        window, _ = model(inp[:, 4:])
    torch.testing.assert_close(segmented[:, 8:], window[:, 4:])
    assert not torch.allclose(segmented[:, 4:8], window[:, :4])  # the middle segment saw the first one


def test_xl_outputs_do_not_depend_on_future_tokens_with_memory():
    """With a memory, changing the current token j leaves the outputs before j unchanged."""
    model = tiny("model=transformer_xl", "model.mem_len=6", "model.same_length=true")
    context, inp = torch.randint(0, 37, (2, 6)), torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        _, state = model(context, return_state=True)
        a, _ = model(inp, state=state)
        changed = inp.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 37
        b, _ = model(changed, state=state)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_evaluate_carries_memory_in_segment_mode():
    """evaluate(carry=False) still carries a Transformer-XL memory, segment to segment, like manual carrying."""
    model = tiny("model=transformer_xl", "model.mem_len=4")
    data = torch.randint(0, 37, (2 * 13,))
    loss, count = evaluate(model, data, batch_size=2, tgt_len=4, carry=False, device=torch.device("cpu"))
    streams = data.view(2, 13)
    inp, tgt = streams[:, :-1], streams[:, 1:]
    total, state = 0.0, None
    with torch.no_grad():
        for start in range(0, 12, 4):
            nll, state = model(inp[:, start : start + 4], tgt[:, start : start + 4], state, True)
            total += nll.sum().item()
    assert count == 24
    assert loss == pytest.approx(total / 24, rel=1e-12)
    no_memory, _ = evaluate(tiny("model=transformer"), data, batch_size=2, tgt_len=4, carry=False,
                            device=torch.device("cpu"))
    assert no_memory != pytest.approx(loss)


def test_carries_state_and_signature():
    """Models with memory or carried fast weights carry state; memory knobs are not part of the signature."""
    assert tiny("model=transformer_xl").carries_state
    assert tiny("model=transformer", "model.mem_len=4").carries_state
    assert not tiny("model=transformer").carries_state
    assert tiny("model=fwm", "model.carry_over=true", "model.pos_emb=false").carries_state
    base = compose_config("model=transformer_xl")
    same = compose_config("model=transformer_xl", "model.mem_len=640", "model.same_length=true", "model.clamp_len=400")
    other = compose_config("model=transformer_xl", "model.adaptive=true", "model.cutoffs=[10]")
    assert model_signature(base) == model_signature(same) != model_signature(other)


def test_shared_relative_biases_unless_untied():
    """By default every layer uses one content/position bias pair; untie_r gives each layer its own."""
    shared = tiny("model=transformer_xl")
    untied = tiny("model=transformer_xl", "model.untie_r=true")
    assert shared.blocks[0].mixer.biases is shared.blocks[1].mixer.biases
    assert untied.blocks[0].mixer.biases is not untied.blocks[1].mixer.biases
    n_shared, n_untied = (sum(p.numel() for p in m.parameters()) for m in (shared, untied))
    assert n_untied - n_shared == 2 * 2 * 16  # one extra (u, v) pair of [n_head=2, d_head=16]


def test_adaptive_lm_with_one_cluster_equals_the_full_softmax_lm():
    """An adaptive LM without cutoffs, given the plain LM's weights, gives the same NLL, log-probs and gradients."""
    plain = tiny("model=transformer")
    adaptive = tiny("model=transformer", "model.adaptive=true")
    state = plain.state_dict()
    renamed = {{"embed.weight": "embed.weights.0", "output.weight": "output.weights.0"}.get(k, k): v
               for k, v in state.items()}
    missing, unexpected = adaptive.load_state_dict(renamed, strict=False)
    assert set(missing) == {"output.cluster_weight", "output.cluster_bias"} and not unexpected
    inp, tgt = torch.randint(0, 37, (2, 2, 9)).unbind(0)
    a, _ = plain(inp, tgt)
    b, _ = adaptive(inp, tgt)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.log_softmax(plain(inp)[0], -1), adaptive(inp)[0])
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(plain.embed.weight.grad, adaptive.embed.weights[0].grad)
    torch.testing.assert_close(plain.blocks[0].ff.net[0].weight.grad, adaptive.blocks[0].ff.net[0].weight.grad)


WT103_SMALL = ("model.n_layer=16", "model.d_model=128", "model.n_head=8", "model.d_head=16", "model.d_inner=2048",
               "model.adaptive=true", "model.cutoffs=[20000,40000,200000]", "model.div_val=1")
WT103_VOCAB = 267_735
# tied embedding 267,735 x 128 + output bias 267,735 + 3 cluster rows and biases (3 x 129) + 16 layers of
# 592,512 (qkv 49,152, output 16,384, feed-forward 526,464, two LayerNorms 512)
# fwm (delta rule) adds a beta projection 128 x 8 per layer; transformer_xl a W_r 128 x 128 per layer and
# one shared (u, v) pair 2 x 8 x 16
EXPECTED = {
    "transformer": 44_018_394,
    "fwm": 44_018_394 + 16 * 128 * 8,
    "transformer_xl": 44_018_394 + 16 * 128**2 + 256,
}


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_count_of_the_wt103_small_setting(name):
    """The original toolkit's WikiText-103 small setting (adaptive softmax, div_val 1, tied) has 44.0M parameters."""
    cfg = compose_config(f"model={name}", *WT103_SMALL)
    with torch.device("meta"):
        model = build_model(cfg, WT103_VOCAB)
    count = sum(p.numel() for p in model.parameters())
    assert count == EXPECTED[name]
    assert round(count / 1e6, 1) == (44.3 if name == "transformer_xl" else 44.0)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=transformer_xl", "model.pos_emb=true"),
        ("model=transformer", "model.same_length=true"),
        ("model=transformer", "model.carry_over=true"),
        ("model=transformer", "model.cutoffs=[10]"),
        ("model=transformer", "model.adaptive=true", "model.cutoffs=[20,10]"),
        ("model=transformer", "model.adaptive=true", "model.cutoffs=[10,20]", "model.div_val=64"),
    ],
    ids=["xl-pos_emb", "same_length-no-mem", "transformer-carry_over", "cutoffs-not-adaptive", "cutoffs-order",
         "div_val-too-big"],
)
def test_incompatible_memory_and_adaptive_options_are_config_errors(overrides):
    """Options that cannot work together fail validation with a one-line message naming the key."""
    from lmtool.config import ConfigError, validate

    with pytest.raises(ConfigError, match="model.") as err:
        validate(compose_config(*overrides))
    assert "\n" not in str(err.value)


def test_a_key_of_another_family_fails_at_compose_time():
    """Each family has its own schema: a memory length on a fast weight model is an unknown key for Hydra."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="mem_len"):
        compose_config("model=fwm", "model.mem_len=8")
