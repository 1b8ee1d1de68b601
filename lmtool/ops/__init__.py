"""Fast-weight update rules as pure tensor functions, each in several forms behind one signature.

``delta_rule`` and ``sum_rule`` take ``q, k: [B, H, L, Dk]``, ``v: [B, H, L, Dv]`` (``beta: [B, H, L]``
for the delta rule) and return ``(o, final_state)``. ``impl`` selects the form: "recurrent" (reference),
"chunk" (chunkwise parallel) or "auto". New forms (native kernels) plug in with :func:`register_impl`.
See ``lmtool/ops/README.md`` for the math.
"""

from lmtool.ops import cuda as _cuda  # noqa: F401  (registers impl="cuda"; builds nothing on import)
from lmtool.ops.delta_rule import delta_rule
from lmtool.ops.registry import available_impls, register_impl
from lmtool.ops.sum_rule import sum_rule

__all__ = ["available_impls", "delta_rule", "register_impl", "sum_rule"]
