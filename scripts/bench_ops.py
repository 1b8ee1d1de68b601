"""Benchmark every available form of the fast-weight ops (lmtool.ops).

    python scripts/bench_ops.py                          # default grid, 1 CPU thread
    python scripts/bench_ops.py --grid target --chunk-sizes 32,64,128
    python scripts/bench_ops.py --device cuda --json

Times forward+backward and forward only (under torch.no_grad) and reports the median over repeats, tokens/s,
peak memory of one call and the useful FLOP rate as a percentage of a 2048x2048 torch.mm measured in the same
process with the same thread count. The reference mm has the rows' dtype on CUDA; on CPU it is fp32 by default
(--peak-dtype): bf16/fp16 matmuls have no fast path on CPUs without bf16/fp16 units, and the torch forms compute
in fp32 anyway. Useful FLOPs are the recurrence's own, whatever a form executes: per token and head 18*Dk*Dv
(delta rule) or 12*Dk*Dv (sum rule) for forward+backward, a third of that for forward only. On a shared machine
the matmul peak is re-measured right before every timed repeat and each row is compared with the median of the
peaks taken during that row. An op name with "+g" (``--ops delta_rule,delta_rule+g``) passes a per-token
log-decay g (float32, Gated DeltaNet's range) to the same op; its useful FLOPs are those of the op.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmtool.ops import available_impls, delta_rule, sum_rule  # noqa: E402
from lmtool.ops.checks import random_problem, useful_flops  # noqa: E402
from lmtool.ops.delta_rule import delta_rule_chunk  # noqa: E402
from lmtool.ops.sum_rule import sum_rule_chunk  # noqa: E402

OPS = {"delta_rule": (delta_rule, delta_rule_chunk), "sum_rule": (sum_rule, sum_rule_chunk)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = (4, 8, 1024, 64, 64)
GRIDS = {  # (B, H, L, Dk, Dv), dtype names
    "small": ([(1, 2, 256, 32, 32)], ["fp32"]),
    "target": ([TARGET], ["fp32"]),
    "default": (
        [(8, 8, 256, 64, 64), TARGET, (1, 8, 4096, 64, 64), (4, 8, 1024, 128, 128)],
        ["fp32", "bf16"],
    ),
}
MEMORY_NOTE = {
    "cuda": "peak memory: torch.cuda.max_memory_allocated during one call, minus what was allocated before",
    "cpu": "peak memory: rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs "
    "after malloc_trim) during one call over the resident set before it",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class MatmulPeak:
    """A 2048 x 2048 torch.mm of the benchmark's dtype on its device: the reference rate in FLOP/s."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pairs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def measure(self, dtype: torch.dtype) -> float:
        if dtype not in self.pairs:
            self.pairs[dtype] = tuple(torch.randn(2048, 2048, device=self.device).to(dtype) for _ in range(2))
            torch.mm(*self.pairs[dtype])
        return 2 * 2048**3 / timed(lambda: torch.mm(*self.pairs[dtype]), self.device)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak extra memory of one call of ``fn`` (see MEMORY_NOTE); None where it cannot be measured."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so reuse shows as growth
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) * 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "cpu"


def base_op(op: str) -> tuple[str, bool]:
    """``"delta_rule+g"`` -> ``("delta_rule", True)``: the op and whether it gets a log-decay g."""
    name, decay = op.removesuffix("+g"), op.endswith("+g")
    if name not in OPS:
        raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}, each optionally with '+g'")
    return name, decay


def make_inputs(op: str, shape, dtype, device, requires_grad: bool):
    """The op's positional inputs, its keyword inputs ({"g": ...} for a "+g" op) and an upstream gradient."""
    op, decay = base_op(op)
    # alpha = exp(g) spread over (0.5, 1), like a trained Gated DeltaNet's gate
    p = random_problem(op, *shape, dtype=dtype, device=device, decay=0.5 if decay else None)
    inputs = [x.detach().clone().requires_grad_(requires_grad) for x in p.inputs()]
    keywords = {} if p.g is None else {"g": p.g.requires_grad_(requires_grad)}
    return inputs, keywords, p.grad_o


def forms(op: str, device: torch.device, impls: list[str] | None, chunk_sizes: list[int]):
    """(label, callable) for every requested form; chunk sizes other than the default are extra rows."""
    public, chunk_fn = OPS[base_op(op)[0]]
    names = available_impls(base_op(op)[0], device) if impls is None else impls
    out = []
    for name in names:
        if name == "chunk" and chunk_sizes:
            for c in chunk_sizes:
                out.append((f"chunk(C={c})", lambda *a, c=c, **kw: chunk_fn(*a, chunk_size=c, **kw)))
        else:
            out.append((name, lambda *a, name=name, **kw: public(*a, impl=name, **kw)))
    return out


def bench_row(op, label, fn, shape, dtype_name, mode, args, peak: MatmulPeak) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[dtype_name]
    backward = mode == "fwd+bwd"
    inputs, keywords, grad_o = make_inputs(op, shape, dtype, device, requires_grad=backward)

    def step():
        if backward:
            o, _ = fn(*inputs, **keywords)
            o.backward(grad_o)
            for x in [*inputs, *keywords.values()]:
                x.grad = None
        else:
            with torch.no_grad():
                fn(*inputs, **keywords)

    step()  # warm-up
    times, peaks = [], []
    peak_dtype = dtype if args.peak_dtype == "input" else torch.float32
    for _ in range(args.repeats):
        peaks.append(peak.measure(peak_dtype))
        times.append(timed(step, device))
    memory = peak_memory_bytes(step, device)
    B, H, L, Dk, Dv = shape
    useful = useful_flops(base_op(op)[0], B, H, L, Dk, Dv, backward=backward)
    ms = statistics.median(times)
    mm_peak = statistics.median(peaks)
    return {
        "op": op,
        "impl": label,
        "B": B,
        "H": H,
        "L": L,
        "Dk": Dk,
        "Dv": Dv,
        "dtype": dtype_name,
        "mode": mode,
        "ms_median": 1e3 * ms,
        "ms_min": 1e3 * min(times),
        "tokens_per_s": B * L / ms,
        "peak_mem_mb": None if memory is None else memory / 2**20,
        "useful_gflops": useful / ms / 1e9,
        "matmul_peak_gflops": mm_peak / 1e9,
        "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
        "pct_of_matmul_peak": 100 * useful / ms / mm_peak,
    }


def decay_cost(op: str, fn, shape, dtype_name: str, args) -> dict:
    """Forward+backward time of ``op`` with a decay over the same op without, timed in alternating pairs (the
    order flips every repeat) so that load drifts cancel: the median and quartiles of the per-pair ratios."""
    device = torch.device(args.device)
    runs = {}
    for name in (op, op + "+g"):
        inputs, keywords, grad_o = make_inputs(name, shape, DTYPES[dtype_name], device, requires_grad=True)

        def step(inputs=inputs, keywords=keywords, grad_o=grad_o):
            o, _ = fn(*inputs, **keywords)
            o.backward(grad_o)
            for x in [*inputs, *keywords.values()]:
                x.grad = None

        step()  # warm-up
        runs[name] = step
    ratios = []
    for i in range(args.repeats):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        t = {name: timed(runs[name], device) for name in order}
        ratios.append(t[op + "+g"] / t[op])
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"op": op, "shape": shape, "dtype": dtype_name, "pairs": len(ratios), "ratio_median": median,
            "ratio_q1": q1, "ratio_q3": q3}  # fmt: skip


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'op':<12} {'impl':<12} {'shape B,H,L,Dk,Dv':<20} {'dtype':<5} {'mode':<7} {'ms':>9} "
        f"{'tokens/s':>10} {'mem MB':>8} {'GFLOP/s':>8} {'mm peak':>8} {'% peak':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['B']},{r['H']},{r['L']},{r['Dk']},{r['Dv']}"
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        lines.append(
            f"{r['op']:<12} {r['impl']:<12} {shape:<20} {r['dtype']:<5} {r['mode']:<7} "
            f"{r['ms_median']:>9.2f} {r['tokens_per_s']:>10.0f} {mem:>8} {r['useful_gflops']:>8.2f} "
            f"{r['matmul_peak_gflops']:>8.1f} {r['pct_of_matmul_peak']:>6.1f}%"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU); default 1")
    p.add_argument("--grid", choices=sorted(GRIDS), default="default")
    p.add_argument("--impls", help="comma-separated forms (default: every form available on the device)")
    p.add_argument("--ops", default="delta_rule,sum_rule", help="e.g. delta_rule,delta_rule+g ('+g': with a decay)")
    p.add_argument("--dtypes", help="comma-separated subset of fp32,bf16,fp16 (default: the grid's)")
    p.add_argument("--modes", default="fwd+bwd,fwd")
    p.add_argument("--chunk-sizes", default="", help="e.g. 32,64,128: one chunk row per size")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--peak-dtype",
        choices=["input", "fp32"],
        help="dtype of the reference mm: the rows' input dtype, or fp32 (default: input on CUDA, fp32 on CPU)",
    )
    p.add_argument("--max-recurrent-len", type=int, help="skip 'recurrent' above this L (CPU 256, CUDA 2048)")
    p.add_argument(
        "--decay-ratio",
        action="store_true",
        help="instead of the table: the time with a decay over the time without, fwd+bwd, in alternating pairs",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.peak_dtype = args.peak_dtype or ("input" if device.type == "cuda" else "fp32")
    max_rec = args.max_recurrent_len or (256 if device.type == "cpu" else 2048)
    shapes, dtype_names = GRIDS[args.grid]
    dtype_names = args.dtypes.split(",") if args.dtypes else dtype_names
    impls = args.impls.split(",") if args.impls else None
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    peak = MatmulPeak(device)
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_avg_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "memory": MEMORY_NOTE["cuda" if device.type == "cuda" else "cpu"],
        "peak_dtype": args.peak_dtype,
    }
    if not args.json:
        print(
            f"# device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
            f"threads {meta['threads']}, median of {args.repeats} repeats"
        )
        print(f"# {meta['memory']}")
        print(
            f"# % peak: useful FLOP/s over a 2048x2048 torch.mm in dtype '{args.peak_dtype}', timed before each repeat"
        )
        print(f"# load average (1, 5, 15 min) before: {meta['load_avg_before']}")
        if not args.decay_ratio:
            print("\n".join(format_table([]).splitlines()[:2]), flush=True)

    if args.decay_ratio:
        results = []
        for op in dict.fromkeys(base_op(o)[0] for o in args.ops.split(",")):
            for label, fn in forms(op, device, impls, chunk_sizes):
                for shape in shapes:
                    for dtype_name in dtype_names:
                        r = {**decay_cost(op, fn, shape, dtype_name, args), "impl": label}
                        results.append(r)
                        if not args.json:
                            print(f"{op:<12} {label:<12} {','.join(map(str, shape)):<20} {dtype_name:<5} decay costs "
                                  f"{r['ratio_median']:.3f}x (quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}, "
                                  f"{r['pairs']} pairs)", flush=True)  # fmt: skip
        if args.json:
            print(json.dumps({"meta": meta, "decay_ratios": results}, indent=1, default=str))
        return

    rows = []
    for op in args.ops.split(","):
        for label, fn in forms(op, device, impls, chunk_sizes):
            for shape in shapes:
                if label == "recurrent" and shape[2] > max_rec:
                    continue
                for dtype_name in dtype_names:
                    for mode in args.modes.split(","):
                        rows.append(bench_row(op, label, fn, shape, dtype_name, mode, args, peak))
                        if not args.json:
                            print(format_table(rows[-1:]).splitlines()[-1], flush=True)

    meta["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print(f"# load average (1, 5, 15 min) after: {meta['load_avg_after']}")


if __name__ == "__main__":
    main()
