"""The retrieval memory equals the toolkit's reference update rules and softmax attention, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtool.models.retrieval import RetrievalMemory, parse_memory, retrieval_loss
from lmtool.ops import delta_rule, sum_rule


def make_inputs(n_symbols: int, length: int, n_queries: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(n_symbols, (3, length), generator=gen)
    values = torch.randint(n_symbols, (3, length), generator=gen)
    queries = torch.randint(n_symbols, (3, n_queries), generator=gen)
    return keys, values, queries


def reference_read(model: RetrievalMemory, keys, values, queries) -> torch.Tensor:
    """The read-out spelled out: dense [e(key); onehot(value)] inputs, the recurrent op, explicit normaliser."""
    onehot = F.one_hot(values, model.n_symbols).double()
    written = model.write(torch.cat([model.embedding(keys), onehot], dim=-1))
    k, q = written[..., : model.d_key], model.query(model.embedding(queries))
    if model.rule == "softmax":
        return torch.softmax(q @ k.transpose(1, 2) / model.d_key**0.5, dim=-1) @ onehot
    phi_k, phi_q = model.features(k).unsqueeze(1), model.features(q).unsqueeze(1)
    v = onehot.unsqueeze(1)
    if model.rule == "sum":
        _, state = sum_rule(phi_k, phi_k, v, output_final_state=True, impl="recurrent")
    else:
        beta = torch.sigmoid(written[..., -1]).unsqueeze(1)
        _, state = delta_rule(phi_k, phi_k, v, beta, output_final_state=True, impl="recurrent")
    out = (phi_q @ state).squeeze(1)
    if model.attn_norm:
        out = out / ((phi_q @ phi_k.sum(2).unsqueeze(-1)).squeeze(1) + model.eps)
    return out


@pytest.mark.parametrize(
    "memory,attn_norm,n_symbols,length",
    [
        ("softmax", None, 7, 7),
        ("sum/elu", None, 7, 7),
        ("sum/dpfp2", None, 9, 18),
        ("sum/dpfp1", False, 9, 18),
        ("delta/dpfp1", None, 9, 18),
        ("delta/elu", None, 6, 31),
        ("delta/elu", True, 6, 12),
    ],
    ids=lambda x: str(x),
)
def test_read_out_matches_reference_with_gradients(memory, attn_norm, n_symbols, length):
    """Outputs and every parameter gradient equal the recurrent reference op on dense one-hot inputs."""
    torch.manual_seed(0)
    model = RetrievalMemory(n_symbols, memory, d_key=8, attn_norm=attn_norm).double()
    keys, values, queries = make_inputs(n_symbols, length, 5)
    fast, ref = model(keys, values, queries), reference_read(model, keys, values, queries)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad((ref * weights).sum(), list(model.parameters()))
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)


def test_favor_memory_runs_and_fixes_features_in_eval():
    """sum/favor<m> builds m random features (d_dot = 2 m) and reads the same in eval mode twice."""
    model = RetrievalMemory(6, "sum/favor16", d_key=8)
    assert model.d_dot == 32
    keys, values, queries = make_inputs(6, 6, 2)
    model.eval()
    assert torch.equal(model(keys, values, queries), model(keys, values, queries))


def test_parse_memory_names():
    """Memory names carry the rule, the map and its number; bad names get a message listing the forms."""
    assert parse_memory("delta/dpfp3") == ("delta", "dpfp", 3)
    assert parse_memory("sum/elu") == ("sum", "elu", None)
    assert parse_memory("softmax") == ("softmax", "", None)
    for bad in ("sum/elux", "gated/elu", "dpfp2"):
        with pytest.raises(ValueError, match="softmax or <sum\\|delta>/<map>"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="only dpfp<nu> and favor<m> take a number"):
        parse_memory("sum/elu3")


def test_loss_is_half_for_zeros_and_skips_absent_keys():
    """Predicting zeros costs 0.5 per query; a perfect read costs 0; target -1 (absent key) is not counted."""
    targets = torch.tensor([[1, -1, 0]])
    assert retrieval_loss(torch.zeros(1, 3, 4), targets).item() == pytest.approx(0.5)
    perfect = F.one_hot(targets.clamp(min=0), 4).float()
    perfect[0, 1] = 7.0  # whatever is read for the absent key does not count
    assert retrieval_loss(perfect, targets).item() == 0.0
