"""Fast-weight update rules as pure tensor functions, each in several forms behind one signature.

``delta_rule`` and ``sum_rule`` take ``q, k: [B, H, L, Dk]``, ``v: [B, H, L, Dv]`` (``beta: [B, H, L]``
for the delta rule) and return ``(o, final_state)``. ``impl`` selects the form: "recurrent" (reference),
"chunk" (chunkwise parallel) or "auto". New forms (native kernels) plug in with :func:`register_impl`.
The recurrent fast weight programmers' scans (``delta_rnn_scan``, ``delta_lstm_scan``, ``rec_delta_scan``,
``srwm_scan``; ``lmtool/ops/recurrent_scan.py``) have a "recurrent" torch form and a "cuda" form.
See ``lmtool/ops/README.md`` for the math.
"""

from lmtool.ops import cuda as _cuda  # noqa: F401  (registers impl="cuda"; builds nothing on import)
from lmtool.ops import recurrent_cuda as _recurrent_cuda  # noqa: F401  (likewise for the recurrent scans)
from lmtool.ops.delta_rule import delta_rule
from lmtool.ops.recurrent_scan import delta_lstm_scan, delta_rnn_scan, rec_delta_scan, srwm_scan
from lmtool.ops.registry import available_impls, register_impl
from lmtool.ops.sum_rule import sum_rule

__all__ = ["available_impls", "delta_lstm_scan", "delta_rnn_scan", "delta_rule", "rec_delta_scan", "register_impl",
           "srwm_scan", "sum_rule"]  # fmt: skip
