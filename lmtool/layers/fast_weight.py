"""Fast weight attention: linear attention as a fast weight programmer (`model=fwm`).

Schlag, Irie & Schmidhuber (2021), "Linear Transformers Are Secretly Fast Weight Programmers",
arXiv 2102.11174. The update rule itself (sum or delta) is an op of `lmtool.ops`; this layer adds the
projections, the feature map, key/query normalisation, the attention normaliser and the output projection.
The layer is configured by the `update_rule` and `feature_map` config groups (`build_fast_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.compile import compilable
from lmtool.layers.dropout import Dropout
from lmtool.layers.feature_maps import FEATURE_MAPS, ElementwiseFeatureMap, make_feature_map
from lmtool.layers.mixer import ModelConfig, TokenMixer, check_layer_args
from lmtool.layers.modern import DecayGate, RMSNorm, ShortConvolution
from lmtool.ops import available_impls, delta_rule, sum_rule

UPDATE_RULES = ("sum", "delta", "delta_product")
QK_NORMS = ("sum", "l2", "none")
DECAY_WITH_NORMALISER = (
    "a decaying state needs attn_norm=false and normalized_retrieval=false (their key sum z does not decay); "
    "use qk_norm=l2 as Gated DeltaNet does"
)


@dataclass
class FastWeightModelConfig(ModelConfig):
    """`model=fwm`: the update rule and feature map come from their own config groups; these are the
    layer's modern options (DeltaNet, arXiv 2406.06484), all off by default (the 2021 layer)."""

    short_conv: int = 0  # kernel size of a causal depthwise convolution + SiLU on q, k, v; 0 = off
    head_norm: bool = False  # RMSNorm of each head's read-out
    output_gate: bool = False  # read-out times silu(W_g x)


def normalize_features(phi: torch.Tensor, qk_norm: str, eps: float) -> torch.Tensor:
    """Key/query normalisation over the last axis: "sum" (the paper's phi / sum(phi), section 4.2), "l2" or
    "none"; the denominator is floored at `eps` (only an all-zero phi, e.g. DPFP, reaches it)."""
    if qk_norm == "sum":
        return phi / phi.sum(-1, keepdim=True).clamp_min(eps)
    if qk_norm == "l2":
        return phi / phi.norm(dim=-1, keepdim=True).clamp_min(eps)
    return phi


@compilable
def elementwise_features(fn: Callable, x: torch.Tensor, qk_norm: str, eps: float) -> torch.Tensor:
    """`normalize_features(fn(x), qk_norm, eps)` for an elementwise feature map `fn`: one fused loop when
    compiled (`lmtool.layers.compile`)."""
    return normalize_features(fn(x), qk_norm, eps)


# (S, z, convolution tail); z is None without a normaliser, the tail None without short_conv. Checkpoints
# written before the convolution existed carry (S, z).
FastWeightState = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class FastWeightAttention(TokenMixer):
    """Multi-head fast weight attention with the sum or delta update rule (a `TokenMixer`).

    Per head, from bias-free projections of x:
        q, k, v = W_q x, W_k x, W_v x;  beta = sigmoid(W_beta x) (delta rule only)
        phi_q, phi_k = norm(phi(q)), norm(phi(k))      phi = `feature_map`, norm = `qk_norm`:
            "sum": phi / sum(phi) (the paper's default for the delta rule), "l2": phi / |phi| (DeltaNet),
            "none"; both denominators are floored at `eps` (only an all-zero phi, e.g. DPFP, hits it)
        S_t = sum or delta update of S_{t-1} with (phi_k_t, v_t, beta_t)        (`lmtool.ops`)
        o_t = S_t^T phi_q_t / sqrt(d_head)
        z_t = z_0 + sum_{j<=t} phi_k_j;  o_t <- o_t / (z_t . phi_q_t + eps)     if `attn_norm`
        y = dropout(W_o concat_h o)
    Residual and LayerNorm live in the block. With `decay` (Gated DeltaNet, arXiv 2412.06464, and the gated sum
    rule) the state first decays by alpha_t = exp(g_t) at every token, g_t from a `DecayGate` of x_t.

    Scale and normaliser: as in the paper's code, 1/sqrt(d_head) scales the read-out, i.e. the numerator
    only (it is passed to the op as its output scale), while the normaliser uses the unscaled phi_q. Folding
    the scale into phi_q instead would cancel in the ratio (up to eps) and change the model.

    Normalised retrieval (`normalized_retrieval`, delta rule, as in the original toolkit): the value to be
    replaced is read with the normaliser, v_bar_t = S_{t-1}^T phi_k_t / d_t, d_t = z_{t-1} . phi_k_t + eps,
    u_t = beta_t (v_t - v_bar_t). Since d_t depends on keys only, u_t = (beta_t / d_t)(d_t v_t - S^T phi_k_t),
    which is the plain delta op with beta' = beta / d and v' = d v. This form is well conditioned for
    non-negative feature maps: every k_j stored in S is also in z, so beta'_t (phi_k_t . phi_k_j) <= beta_t
    in the op's triangular solve, and the one large beta' (the first token from a zero state, d = eps)
    multiplies S_0^T phi_k = 0, while beta' v' = beta v is formed from two well-rounded factors. (The original
    toolkit instead rescaled the write key, k' = k / d, beta' = beta d, which puts 1 / d into the solve.)
    z_{t-1} . phi_k_t is floored at 0 before adding eps, so d_t >= eps; it requires a non-negative map.

    State: `(S [B, H, d_dot, d_head], z [B, H, d_dot])`, float32 (float64 for float64 inputs); z is None
    when neither `attn_norm` nor `normalized_retrieval` needs it. `state=None` starts from zeros; the new
    state is returned only when `return_state` (z_T = z_0 + sum_t phi_k_t). The caller detaches it. The state
    has a fixed size whatever the context length; one token (L = 1) runs one step of the recurrent form.
    The fast-weight math runs in float32 even under bf16/fp16 autocast; the read-out is cast back to the
    projections' dtype before the output projection.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        dropout: float,
        *,
        update_rule: str = "delta",
        feature_map: nn.Module,
        qk_norm: str = "sum",
        attn_norm: bool = True,
        normalized_retrieval: bool = False,
        eps: float = 1e-5,
        impl: str = "auto",
        n_householder: int = 1,
        allow_neg_eigval: bool = False,
        short_conv: int = 0,
        head_norm: bool = False,
        output_gate: bool = False,
        decay: bool = False,
    ) -> None:
        super().__init__()
        check_layer_args("FastWeightAttention", sizes={"d_model": d_model, "n_head": n_head, "d_head": d_head},
                         dropouts={"dropout": dropout})  # fmt: skip
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"unknown update rule {update_rule!r}; choose one of {UPDATE_RULES}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"unknown qk_norm {qk_norm!r}; choose one of {QK_NORMS}")
        nonnegative = getattr(feature_map, "nonnegative", False)
        if qk_norm == "sum" and not nonnegative:
            raise ValueError(
                "qk_norm='sum' divides by sum(phi), which a signed feature map can drive to zero (the sums "
                "diverge): use qk_norm='l2' or 'none', or a non-negative map (elu, favor, dpfp, relu)"
            )
        if eps <= 0:
            raise ValueError(f"eps must be positive (it floors the normalisers), got {eps}")
        if impl not in ("auto", *available_impls("delta_rule")):
            raise ValueError(f"unknown impl {impl!r}; choose one of auto, {', '.join(available_impls('delta_rule'))}")
        if normalized_retrieval and update_rule == "sum":
            raise ValueError("normalized_retrieval applies to the delta rule only; set update_rule=delta")
        if n_householder < 1 or (n_householder > 1 and update_rule != "delta_product"):
            raise ValueError(
                f"n_householder={n_householder}: give n_householder >= 1, and more than 1 only with "
                "update_rule='delta_product'"
            )
        if allow_neg_eigval and update_rule == "sum":
            raise ValueError("allow_neg_eigval sets beta in (0, 2): it needs a delta rule (delta, delta_product)")
        if short_conv < 0:
            raise ValueError(f"short_conv is a kernel size (0 = off), got {short_conv}")
        if decay and (attn_norm or normalized_retrieval):
            raise ValueError(DECAY_WITH_NORMALISER)
        if normalized_retrieval and not nonnegative:
            raise ValueError(
                "normalized_retrieval divides by z . phi(k) and needs a non-negative feature map "
                "(elu, favor, dpfp, relu)"
            )
        self.n_head, self.d_head = n_head, d_head
        self.update_rule, self.qk_norm, self.attn_norm = update_rule, qk_norm, attn_norm
        self.normalized_retrieval, self.eps, self.impl = normalized_retrieval, eps, impl
        self.n_householder, self.allow_neg_eigval = n_householder, allow_neg_eigval
        self.scale = d_head**-0.5
        self.feature_map = feature_map
        self.d_dot: int = feature_map.d_dot
        width = n_head * d_head
        # q, then n_householder keys and values per token (one of each for the sum and delta rules)
        self.qkv = nn.Linear(d_model, (1 + 2 * n_householder) * width, bias=False)
        self.beta = nn.Linear(d_model, n_householder * n_head, bias=False) if update_rule != "sum" else None
        self.conv = ShortConvolution(self.qkv.out_features, short_conv) if short_conv > 0 else None
        self.head_norm = RMSNorm(d_head) if head_norm else None
        self.gate = nn.Linear(d_model, width, bias=False) if output_gate else None
        self.decay_gate = DecayGate(d_model, n_head) if decay else None
        self.out = nn.Linear(width, d_model, bias=False)
        self.drop = Dropout(dropout)

    @property
    def carries_z(self) -> bool:
        """Whether the state carries the key sum z (needed by the normaliser or normalised retrieval)."""
        return self.attn_norm or self.normalized_retrieval

    def extra_repr(self) -> str:
        return (
            f"n_head={self.n_head}, d_head={self.d_head}, d_dot={self.d_dot}, "
            f"update_rule={self.update_rule}, qk_norm={self.qk_norm}, attn_norm={self.attn_norm}, "
            f"normalized_retrieval={self.normalized_retrieval}, impl={self.impl}, "
            f"n_householder={self.n_householder}, allow_neg_eigval={self.allow_neg_eigval}, "
            f"decay={self.decay_gate is not None}"
        )

    def _normalize(self, phi: torch.Tensor) -> torch.Tensor:
        return normalize_features(phi, self.qk_norm, self.eps)

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> Any:
        S0, z0 = self._initial_state(None, batch_size, torch.promote_types(dtype, torch.float32), device)
        tail = None if self.conv is None else self.conv.empty_tail(batch_size, device=device, dtype=dtype)
        return S0, z0, tail

    def _initial_state(
        self, state: FastWeightState | None, B: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if state is None:
            S0 = torch.zeros(B, self.n_head, self.d_dot, self.d_head, dtype=dtype, device=device)
            z0 = S0.new_zeros(B, self.n_head, self.d_dot) if self.carries_z else None
            return S0, z0
        S0, z0 = state[:2]
        if self.carries_z and z0 is None:
            raise ValueError(
                "the carried fast weight state has no key sum z, which attn_norm/normalized_retrieval "
                "needs; pass a state produced by a layer with the same options"
            )
        return S0.to(dtype), (z0.to(dtype) if self.carries_z else None)

    def _project(self, x: torch.Tensor, state: FastWeightState | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q/k/v projections `[B, L, (1 + 2 n_h) H D]`, through the short convolution if any, and its tail."""
        proj = self.qkv(x)
        if self.conv is None:
            return proj, None
        return self.conv(proj, state[2] if state is not None and len(state) > 2 else None)

    def _substeps(self, proj: torch.Tensor, x: torch.Tensor, dtype: torch.dtype):
        """q, k, v `[B, H, L n_h, D]` and beta `[B, H, L n_h]` over the sequence of sub-steps: token t's n_h
        Householder steps are positions t n_h .. t n_h + n_h - 1 (n_h = 1: the tokens themselves)."""
        B, L, _ = proj.shape
        H, D, n = self.n_head, self.d_head, self.n_householder
        q, k, v = proj.to(dtype).split([H * D, n * H * D, n * H * D], dim=-1)
        q = q.view(B, L, H, D).transpose(1, 2)
        k = k.view(B, L, n, H, D).permute(0, 3, 1, 2, 4).reshape(B, H, L * n, D)
        v = v.view(B, L, n, H, D).permute(0, 3, 1, 2, 4).reshape(B, H, L * n, D)
        beta = None
        if self.beta is not None:
            beta = torch.sigmoid(self.beta(x).to(dtype)).view(B, L, n, H).permute(0, 3, 1, 2).reshape(B, H, L * n)
            beta = 2 * beta if self.allow_neg_eigval else beta  # eigenvalues of I - beta k k^T in (-1, 1]
        return q, k, v, beta

    def _log_decay(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """g `[B, H, L n_h]`: each token's log-decay on its first sub-step, 0 on the others (None without decay)."""
        if self.decay_gate is None:
            return None
        g = self.decay_gate(x, dtype)
        n = self.n_householder
        if n == 1:
            return g
        B, H, L = g.shape
        return torch.cat([g.unsqueeze(-1), g.new_zeros(B, H, L, n - 1)], dim=-1).view(B, H, L * n)

    def _read_at_last_substep(self, phi_q: torch.Tensor) -> torch.Tensor:
        """phi_q `[B, H, L, d]` placed at each token's last sub-step, zeros at the others."""
        n = self.n_householder
        if n == 1:
            return phi_q
        B, H, L, d = phi_q.shape
        placed = phi_q.new_zeros(B, H, L, n, d)
        placed[:, :, :, -1] = phi_q
        return placed.view(B, H, L * n, d)

    def forward(
        self, x: torch.Tensor, state: FastWeightState | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, FastWeightState | None]:
        B, L, _ = x.shape
        H, D, n = self.n_head, self.d_head, self.n_householder
        proj, tail = self._project(x, state)
        out_dtype = proj.dtype
        dtype = torch.promote_types(proj.dtype, torch.float32)
        # one token (decoding): a single step of the recurrence beats setting up a chunked solve
        impl = "recurrent" if L == 1 and self.impl == "auto" else self.impl
        with torch.autocast(x.device.type, enabled=False):
            q, k, v, beta = self._substeps(proj, x, dtype)
            g = self._log_decay(x, dtype)
            # one call for q and k so that a random feature map uses one projection for both
            qk = torch.cat([q, k], dim=2)
            if isinstance(self.feature_map, ElementwiseFeatureMap):  # a pure function: compiled if enabled
                phi = elementwise_features(self.feature_map.fn, qk, self.qk_norm, self.eps)
            else:
                phi = self._normalize(self.feature_map(qk))
            phi_q, phi_k = phi.split([L, L * n], dim=2)
            phi_q = self._read_at_last_substep(phi_q)
            S0, z0 = self._initial_state(state, B, dtype, x.device)
            z = None if z0 is None else z0.unsqueeze(2) + torch.cumsum(phi_k, dim=2)  # z_t, [B, H, L n, d_dot]
            if self.update_rule == "sum":
                o, S = sum_rule(
                    phi_q, phi_k, v, g=g, scale=self.scale, initial_state=S0,
                    output_final_state=return_state, impl=impl,
                )  # fmt: skip
            else:
                if self.normalized_retrieval:
                    z_prev = torch.cat([z0.unsqueeze(2), z[:, :, :-1]], dim=2)  # z_{t-1}
                    d = (z_prev * phi_k).sum(-1).clamp_min(0.0) + self.eps  # [B, H, L n]
                    beta, v = beta / d, v * d.unsqueeze(-1)
                o, S = delta_rule(
                    phi_q, phi_k, v, beta, g=g, scale=self.scale, initial_state=S0,
                    output_final_state=return_state, impl=impl,
                )  # fmt: skip
            if self.attn_norm:
                o = o / ((z * phi_q).sum(-1, keepdim=True) + self.eps)
            o = o.reshape(B, H, L, n, D)[:, :, :, -1]  # the read-out after each token's last sub-step
            if self.head_norm is not None:
                o = self.head_norm(o)
        o = o.transpose(1, 2).reshape(B, L, H * D).to(out_dtype)
        if self.gate is not None:
            o = o * F.silu(self.gate(x))
        y = self.drop(self.out(o))
        if not return_state:
            return y, None
        z_last = None if z0 is None else z0 + phi_k.sum(dim=2)
        return y, (S, z_last, tail)


def validate_fast_weight_config(cfg: Any) -> str | None:
    """The reason why the `update_rule` / `feature_map` / `model` combination cannot be built, or None."""
    rule, fmap, model = cfg.update_rule, cfg.feature_map, cfg.model
    for key, value, allowed in (
        ("update_rule.name", rule.name, UPDATE_RULES),
        ("update_rule.qk_norm", rule.qk_norm, QK_NORMS),
        ("update_rule.impl", rule.impl, ("auto", *available_impls("delta_rule"))),
        ("feature_map.name", fmap.name, tuple(FEATURE_MAPS)),
    ):
        if value not in allowed:
            return f"{key}={value} is not one of {', '.join(allowed)}"
    if fmap.name == "identity" and (rule.qk_norm == "sum" or rule.normalized_retrieval):
        return (
            "feature_map=identity can be negative, so update_rule.qk_norm=sum and normalized_retrieval divide "
            "by sums that may vanish: use update_rule.qk_norm=l2 (DeltaNet) or none"
        )
    if rule.normalized_retrieval and rule.name == "sum":
        return "update_rule.normalized_retrieval=true needs a delta rule (update_rule=delta or delta_product)"
    if rule.n_householder < 1 or (rule.n_householder > 1 and rule.name != "delta_product"):
        return f"update_rule.n_householder={rule.n_householder}: at least 1, and more than 1 only for delta_product"
    if rule.allow_neg_eigval and rule.name == "sum":
        return "update_rule.allow_neg_eigval=true needs a delta rule (update_rule=delta or delta_product)"
    if model.short_conv < 0:
        return f"model.short_conv is a kernel size (0 = off), got {model.short_conv}"
    if rule.decay and (rule.attn_norm or rule.normalized_retrieval):
        return "update_rule.decay=true: " + DECAY_WITH_NORMALISER
    if model.carry_over and model.pos_emb:
        return (
            "model.carry_over=true needs model.pos_emb=false: absolute positions would grow without bound "
            "while the model was trained on short segments"
        )
    return None


def build_fast_weight(cfg: Any) -> Callable[[int], TokenMixer]:
    """`layer index -> FastWeightAttention` for `model=fwm`, from the update_rule and feature_map groups."""
    m, rule, fmap = cfg.model, cfg.update_rule, cfg.feature_map

    def make(i: int) -> TokenMixer:
        phi = make_feature_map(
            fmap.name, m.d_head, nu=fmap.nu, n_features=fmap.n_features,
            redraw=fmap.redraw, redraw_interval=fmap.redraw_interval,
        )  # fmt: skip
        return FastWeightAttention(
            m.d_model, m.n_head, m.d_head, m.dropout, update_rule=rule.name, feature_map=phi,
            qk_norm=rule.qk_norm, attn_norm=rule.attn_norm, normalized_retrieval=rule.normalized_retrieval,
            eps=rule.eps, impl=rule.impl, n_householder=rule.n_householder, allow_neg_eigval=rule.allow_neg_eigval,
            short_conv=m.short_conv, head_norm=m.head_norm, output_gate=m.output_gate, decay=rule.decay,
        )  # fmt: skip

    return make
