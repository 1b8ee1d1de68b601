"""Relative (Transformer-XL) attention against a per-(query, key) loop written from the paper's equations."""

from __future__ import annotations

import pytest
import torch

from lmtool.layers.attention import SoftmaxAttention, memory_attention_mask
from lmtool.layers.relative_attention import RelativeAttention, relative_shift

D_MODEL, N_HEAD, D_HEAD = 8, 2, 4


def make_layer(**kwargs) -> RelativeAttention:
    """A tiny float64 layer in eval mode with every parameter (biases included) drawn large."""
    torch.manual_seed(0)
    layer = RelativeAttention(D_MODEL, N_HEAD, D_HEAD, 0.0, 0.0, **kwargs)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    return layer.double().eval()


def reference(layer: RelativeAttention, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """score(i, j) = (q_i + u) . k_j + (q_i + v) . W_r R(min(M + i - j, clamp)), masked, softmax, W_o."""
    B, L, _ = x.shape
    full = x if memory is None else torch.cat([memory, x], 1)
    K = full.shape[1]
    M = K - L
    w_q, w_k, w_v = layer.qkv.weight.view(3, N_HEAD, D_HEAD, D_MODEL)
    q = torch.einsum("bld,hed->blhe", x, w_q)
    k = torch.einsum("bld,hed->blhe", full, w_k)
    v = torch.einsum("bld,hed->blhe", full, w_v)
    u, vb = layer.biases.content, layer.biases.position
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, D_MODEL, 2.0, dtype=torch.float64) / D_MODEL))
    out = torch.zeros(B, L, N_HEAD, D_HEAD, dtype=x.dtype)
    for i in range(L):
        scores = torch.full((B, N_HEAD, K), float("-inf"), dtype=x.dtype)
        for j in range(K):
            dist = M + i - j
            if dist < 0 or (layer.same_length and dist >= layer.mem_len):
                continue
            if layer.clamp_len > 0:
                dist = min(dist, layer.clamp_len)
            enc = torch.cat([torch.sin(dist * inv_freq), torch.cos(dist * inv_freq)])
            r = (layer.pos.weight @ enc).view(N_HEAD, D_HEAD)
            scores[:, :, j] = ((q[:, i] + u) * k[:, j]).sum(-1) + ((q[:, i] + vb) * r).sum(-1)
        attn = torch.softmax(scores / D_HEAD**0.5, dim=-1)  # [B, H, K]
        out[:, i] = torch.einsum("bhk,bkhe->bhe", attn, v)
    return out.reshape(B, L, N_HEAD * D_HEAD) @ layer.out.weight.T


@pytest.mark.parametrize("L,K", [(5, 5), (4, 9), (1, 6)], ids=lambda x: str(x))
def test_relative_shift_matches_naive_loop(L, K):
    """relative_shift puts the score of distance K-L+i-j (column K-1-distance) at column j, on every causal entry."""
    x = torch.randn(2, 3, L, K, dtype=torch.float64)
    shifted = relative_shift(x)
    for i in range(L):
        for j in range(K - L + i + 1):
            distance = K - L + i - j
            torch.testing.assert_close(shifted[..., i, j], x[..., i, K - 1 - distance], rtol=0, atol=0)


CASES = {
    "no-memory": dict(mem_len=0, M=0),
    "memory": dict(mem_len=6, M=4),
    "clamp": dict(mem_len=6, M=4, clamp_len=2),
    "same-length": dict(mem_len=3, M=4, same_length=True),
    "same-length-clamp": dict(mem_len=5, M=5, same_length=True, clamp_len=3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layer_matches_reference_loop(case):
    """Outputs and all gradients equal the per-(query, key) loop, with memory, clamp_len and same_length."""
    case = dict(case)
    M = case.pop("M")
    layer = make_layer(**case)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, M, D_MODEL, dtype=torch.float64, requires_grad=True) if M else None
    y, _ = layer(x, memory)
    ref = reference(layer, x, memory)
    torch.testing.assert_close(y, ref)
    leaves = [x, *([memory] if M else []), *layer.parameters()]
    grads = torch.autograd.grad((y * ref.detach().cos()).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * ref.detach().cos()).sum(), leaves)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


def test_clamp_len_shares_the_encoding_of_far_distances():
    """With clamp_len c, every distance >= c gets the encoding of c; a clamp beyond the window changes nothing."""
    enc = make_layer(clamp_len=3).encodings(8)  # distances 7 .. 0
    for row in range(5):  # distances 7 .. 3
        torch.testing.assert_close(enc[row], enc[4])
    assert not torch.allclose(enc[4], enc[5])
    x, memory = torch.randn(2, 4, D_MODEL, dtype=torch.float64), torch.randn(2, 4, D_MODEL, dtype=torch.float64)
    far, _ = make_layer(mem_len=4, clamp_len=7)(x, memory)
    off, _ = make_layer(mem_len=4)(x, memory)
    near, _ = make_layer(mem_len=4, clamp_len=2)(x, memory)
    torch.testing.assert_close(far, off)
    assert not torch.allclose(near, off)


def test_same_length_mask_gives_every_query_the_same_number_of_keys():
    """With a window, query i sees the window keys ending at itself (fewer only before enough context exists)."""
    mask = memory_attention_mask(5, 3, window=4)
    assert mask.sum(1).tolist() == [4, 4, 4, 4, 4]
    for i in range(5):
        assert mask[i].nonzero().squeeze(1).tolist() == list(range(i, i + 4))
    causal = memory_attention_mask(3, 2)
    assert causal.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    assert memory_attention_mask(4, 0, window=2).sum(1).tolist() == [1, 2, 2, 2]


def test_same_length_ignores_keys_outside_the_window():
    """Changing a memory entry outside every query's window leaves the outputs unchanged."""
    layer = make_layer(mem_len=4, same_length=True)
    x, memory = torch.randn(1, 3, D_MODEL, dtype=torch.float64), torch.randn(1, 4, D_MODEL, dtype=torch.float64)
    changed = memory.clone()
    changed[:, 0] += 1.0  # key 0: the first query (key 4) sees keys 1..4
    torch.testing.assert_close(layer(x, memory)[0], layer(x, changed)[0])
    changed[:, 1] += 1.0  # key 1 is in the first query's window
    assert not torch.allclose(layer(x, memory)[0][:, 0], layer(x, changed)[0][:, 0])


@pytest.mark.parametrize("mixer", ["relative", "softmax"])
def test_memory_equals_attending_over_the_concatenation(mixer):
    """One layer over x with memory m equals the layer over cat(m, x) at x's positions; the new memory is the
    last mem_len inputs, detached."""
    torch.manual_seed(1)
    if mixer == "relative":
        layer = make_layer(mem_len=5)
    else:
        layer = SoftmaxAttention(D_MODEL, N_HEAD, D_HEAD, 0.0, 0.0, mem_len=5).double().eval()
    memory = torch.randn(2, 3, D_MODEL, dtype=torch.float64)
    x = torch.randn(2, 4, D_MODEL, dtype=torch.float64, requires_grad=True)
    y, new_memory = layer(x, memory, return_state=True)
    full, _ = layer(torch.cat([memory, x], 1))
    torch.testing.assert_close(y, full[:, 3:])
    torch.testing.assert_close(new_memory, torch.cat([memory, x], 1)[:, -5:].detach())
    assert not new_memory.requires_grad
    assert layer(x, memory, return_state=False)[1] is None


@pytest.mark.parametrize(
    "layer,kwargs,match",
    [
        ("softmax", {"mem_len": -1}, "mem_len must be at least 0"),
        ("softmax", {"dropatt": -0.1}, "dropatt must be in"),
        ("relative", {"clamp_len": -2}, "clamp_len must be at least 0"),
        ("relative", {"n_head": 0}, "n_head must be at least 1"),
        ("relative", {"same_length": True}, "needs mem_len > 0"),
    ],
    ids=["softmax-mem_len", "softmax-dropatt", "xl-clamp_len", "xl-n_head", "xl-same_length"],
)
def test_bad_layer_arguments_fail_at_construction(layer, kwargs, match):
    """Attention layers built by hand refuse bad sizes, lengths and rates with a message naming the argument."""
    cls = SoftmaxAttention if layer == "softmax" else RelativeAttention
    args = {"d_model": D_MODEL, "n_head": N_HEAD, "d_head": D_HEAD, "dropout": 0.0, "dropatt": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**args)
