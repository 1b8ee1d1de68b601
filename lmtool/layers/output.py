"""The linear softmax output layer and its loss in one autograd function.

`F.cross_entropy(F.linear(h, W, b), t)` keeps the `[N, V]` logits, writes their log-softmax as another `[N, V]`
tensor, and in the backward fills a third with zeros to scatter the loss gradient into, then a fourth for the
log-softmax gradient. At lmtool's default size (2,048 tokens x 10,000 words, 82 MB each in float32) those passes
over memory cost about as much as the output matmuls themselves on a CPU. `linear_cross_entropy` computes the
same per-token losses keeping one `[N, V]` buffer: the logits, turned in place into the softmax probabilities
that the backward needs (`d logits = p - onehot(t)`, scaled by the incoming gradient in place). The backward
consumes them, so a graph through it is differentiated once: a second backward (retain_graph) raises autograd's
in-place error rather than returning wrong gradients.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, compute_dtype):
        # the matmul in the autocast dtype (as F.linear would run it), the softmax in float32 or wider
        matmul_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        with torch.autocast(h.device.type, enabled=False):
            hm = h if matmul_dtype is None else h.to(matmul_dtype)
            wm = weight if matmul_dtype is None else weight.to(matmul_dtype)
            logits = hm @ wm.T
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            logits = logits.to(compute_dtype)
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
        ctx.save_for_backward(hm, wm, probs, target)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll):
        hm, wm, probs, target = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # d nll_i / d logits_ij = p_ij - [j = t_i], times the incoming gradient of row i
        dlogits = probs.mul_(grad_nll.to(probs.dtype).unsqueeze(1))
        dlogits[torch.arange(len(target), device=target.device), target] -= grad_nll.to(probs.dtype)
        dbias = dlogits.sum(0).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        dl = dlogits.to(hm.dtype)
        dh = (dl @ wm).to(h_dtype) if ctx.needs_input_grad[0] else None
        dw = (dl.T @ hm).to(w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, dbias, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """Per-token `-log softmax(h W^T + b)[target]` for `h [N, d]`, `weight [V, d]`, `target [N]` (int64).

    Equal to `F.cross_entropy(F.linear(h, weight, bias), target, reduction="none")` computed in float32 (float64
    for float64 inputs), with the matmul in the autocast dtype when autocast is on. Returns `[N]`.
    """
    compute_dtype = torch.float64 if h.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    return _LinearCrossEntropy.apply(h, weight, bias, target, compute_dtype)
