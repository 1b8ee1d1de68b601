"""The causal LM: causality, carried state, initialisation, and every fast-weight pair learns."""

from __future__ import annotations

import pytest
import torch

from lmtool.models.build import build_model
from tests.helpers import compose_config

PAIRS = [(rule, fmap) for rule in ("sum", "delta") for fmap in ("elu", "favor", "dpfp")]
MODELS = [
    ("model=transformer",),
    ("model=transformer_xl",),
    ("model=transformer_xl", "model.adaptive=true", "model.cutoffs=[10,20]", "model.div_val=2"),
    *[("model=fwm", f"update_rule={r}", f"feature_map={f}") for r, f in PAIRS],
]


def tiny(*overrides: str, vocab: int = 37) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = compose_config("debug=smoke", "model.dropout=0", "feature_map.redraw=fixed", *overrides)
    return build_model(cfg, vocab).double()


@pytest.mark.parametrize("overrides", MODELS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_outputs_do_not_depend_on_future_tokens(overrides):
    """Changing the token at position j leaves every logit before j unchanged."""
    model = tiny(*overrides).eval()
    inp = torch.randint(0, 37, (2, 12))
    changed = inp.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 37
    with torch.no_grad():
        a, _ = model(inp)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("pre_lnorm", [False, True], ids=["postLN", "preLN"])
def test_carried_state_equals_one_pass(rule, pre_lnorm):
    """Two half segments with fast weights carried give the same NLL as one pass (no positions)."""
    model = tiny("model=fwm", f"update_rule={rule}", "model.pos_emb=false", f"model.pre_lnorm={pre_lnorm}").eval()
    inp, tgt = torch.randint(0, 37, (2, 2, 10)).unbind(0)
    with torch.no_grad():
        full, _ = model(inp, tgt)
        first, state = model(inp[:, :4], tgt[:, :4], return_state=True)
        second, _ = model(inp[:, 4:], tgt[:, 4:], state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), full)


def test_seed_initialisation():
    """Linear weights are N(0, 0.02), biases zero, and the output softmax is tied to the embedding."""
    cfg = compose_config("model=transformer", "model.d_model=256", "model.d_inner=1024")
    model = build_model(cfg, 1000)
    ff = model.blocks[0].ff.net[0]
    assert ff.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(ff.bias) == 0
    assert model.output.weight is model.embed.weight


@pytest.mark.parametrize("rule,fmap", PAIRS, ids=[f"{r}-{f}" for r, f in PAIRS])
def test_every_fast_weight_pair_learns(rule, fmap):
    """Each (update rule, feature map) pair drives the loss of a small repeated batch down."""
    model = tiny("model=fwm", f"update_rule={rule}", f"feature_map={fmap}").float().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    inp, tgt = torch.randint(0, 37, (2, 4, 16)).unbind(0)
    losses = []
    for _ in range(25):
        nll, _ = model(inp, tgt)
        loss = nll.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
