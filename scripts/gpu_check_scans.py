"""scripts/gpu_check.py's part for the recurrent scans' kernels (Delta RNN, Delta LSTM, Recurrent Delta Net, SRWM):
parity against the float64 torch form and timings against the torch loop, and their lines of the report.

``device`` is "cuda" (the "cuda" forms, strict: a failed self-check is a failed row) or, with ``dry`` (gpu_check's
--cpu-dry-run), "cpu" with the torch forms at tiny sizes. Inputs and comparisons come from lmtool.ops.checks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from lmtool.ops import checks, recurrent_cuda
from lmtool.ops.checks import random_scan_problem, scan_outputs_and_grads, worst_error
from lmtool.ops.recurrent_scan import TORCH_FORMS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (B, H, L, D, checkpoint_every, with_state): d_head 8 to 64, odd L, L a multiple of C, one token, no initial state
PARITY_SHAPES = [(2, 2, 150, 16, 64, True), (2, 3, 97, 32, 16, False), (1, 2, 130, 64, 64, True),
                 (3, 2, 65, 20, 8, True), (1, 1, 1, 8, 64, True)]  # fmt: skip
DRY_SHAPES = [(1, 2, 21, 8, 8, True), (1, 1, 1, 8, 64, False)]  # the dry run's torch form is slow on a CPU
TIMING = ((16, 8, 32), [256, 1024])  # (B, H, D), lengths: the recipes' d_head is 16 to 32


def forms(dry: bool) -> dict[str, Callable]:
    """The forms under test: the "cuda" forms, or in a dry run the torch forms."""
    return TORCH_FORMS if dry else recurrent_cuda.CUDA_FORMS


def parity_row(op: str, dt: str, shape: tuple, seed: int, device: str, dry: bool) -> dict:
    B, H, L, D, C, with_state = shape
    label = f"{op} {dt} B,H,L,D={B},{H},{L},{D} C={C}{'' if with_state else ' no initial state'}"
    p = random_scan_problem(op, B, H, L, D, dtype=DTYPES[dt], device=device, seed=seed)
    try:
        kwargs = {} if dry else {"checkpoint_every": C}
        actual = scan_outputs_and_grads(forms(dry)[op], p, with_state=with_state, **kwargs)
        expected = scan_outputs_and_grads(TORCH_FORMS[op], p.to(torch.float64), with_state=with_state)
        errors = checks.relative_errors(actual, expected, checks.scan_grad_names(op, with_state=with_state))
        error = worst_error(errors, checks.TOLERANCE[DTYPES[dt]])
    except Exception as err:  # a failed self-check (strict) or a launch error
        errors, error = {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return {"case": label, "ok": error is None, "error": error, "errors": errors}


def carried_halves_row(op: str, device: str, dry: bool) -> dict:
    """Two half-segments with the state carried against one pass (fp32, no_grad)."""
    L, half = (40, 17) if dry else (300, 123)
    p = random_scan_problem(op, 2, 2, L, 32, device=device, seed=8)
    n = 1 if op in recurrent_cuda.ONE_INPUT else 4  # inputs with a token axis; rec is shared
    form = forms(dry)[op]
    with torch.no_grad():
        y, full = form(*p.inputs, initial_state=p.state, output_final_state=True)
        y1, mid = form(*(x[:, :, :half] for x in p.inputs[:n]), *p.inputs[n:], initial_state=p.state,
                       output_final_state=True)  # fmt: skip
        y2, end = form(*(x[:, :, half:] for x in p.inputs[:n]), *p.inputs[n:], initial_state=mid,
                       output_final_state=True)  # fmt: skip
    names = ["y", *(f"final {i}" for i in range(len(full)))]
    error = worst_error(checks.relative_errors([torch.cat([y1, y2], 2), *end], [y, *full], names), 1e-5)
    return {"case": f"{op} fp32 two carried halves == one pass", "ok": error is None, "error": error}


def section_parity(guard, results: dict, device: str, dry: bool, log: Callable[[str], None]) -> bool:
    """The scans' kernels against the float64 torch form, NaN-poisoned, odd shapes, carried state."""
    os.environ["LMTOOL_CUDA_POISON"] = "1"
    rows, seed = [], 200
    for op in TORCH_FORMS:
        for dt in DTYPES:
            for shape in DRY_SHAPES if dry else PARITY_SHAPES:
                seed += 1
                if not guard.fits(150):
                    rows.append({"case": f"{op} {dt} {shape}", "ok": False, "skipped": "time budget"})
                    continue
                rows.append(parity_row(op, dt, shape, seed, device, dry))
                if rows[-1]["error"]:
                    log(f"SCAN PARITY FAIL {rows[-1]['case']}: {rows[-1]['error']}")
        rows.append(carried_halves_row(op, device, dry))
    os.environ["LMTOOL_CUDA_POISON"] = "0"
    ok_all = all(r["ok"] for r in rows)
    results["scan_parity"] = {"ok": ok_all, "rows": rows, "self_checks": recurrent_cuda.EXTENSION.verdicts()}
    log(f"scan parity: {sum(r['ok'] for r in rows)}/{len(rows)} cases pass")
    return ok_all


def time_scan(form: Callable, p, repeats: int, device: str) -> float:
    """Median milliseconds of forward+backward of ``form`` on ``p`` (after one warm-up call)."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scan_outputs_and_grads(form, p)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[1:])[len(times[1:]) // 2]


def section_timing(guard, results: dict, device: str, dry: bool, log: Callable[[str], None]) -> None:
    """fwd+bwd of the scans: the kernels ("cuda") against the torch loop the layers ran before ("recurrent")."""
    (B, H, D), lengths = ((1, 2, 8), [8]) if dry else TIMING
    impls = {"recurrent": TORCH_FORMS} if dry else {"cuda": recurrent_cuda.CUDA_FORMS, "recurrent": TORCH_FORMS}
    rows = []
    for L in lengths:
        for op in TORCH_FORMS:
            for dt in ["fp32"] if dry else DTYPES:
                p = random_scan_problem(op, B, H, L, D, dtype=DTYPES[dt], device=device, seed=9)
                for impl, table in impls.items():
                    row = {"op": op, "impl": impl, "L": L, "dtype": dt, "B,H,D": f"{B},{H},{D}"}
                    if not guard.fits(60):
                        rows.append({**row, "skipped": "time budget"})
                        continue
                    try:
                        ms = time_scan(table[op], p, 1 if dry else 3, device)
                        rows.append({**row, "ms_median": ms, "tokens_per_s": B * L / ms * 1e3})
                    except Exception as err:  # e.g. out of memory: record, go on
                        rows.append({**row, "error": str(err)[:200]})
    results["scan_timing"] = rows
    log(f"timed {sum('ms_median' in r for r in rows)} scan rows")


def report_lines(results: dict) -> list[str]:
    """The scans' sections of report.md: self-checks, parity table, timing table."""
    scans = results.get("scan_parity", {})
    lines = ["", "## Recurrent scans: self-checks", ""]
    lines += [f"- `{k}`: {v or 'passed'}" for k, v in scans.get("self_checks", {}).items()]
    lines += ["", "## Recurrent scans: parity against float64", "", "| case | ok | worst |", "|---|---|---|"]
    for r in scans.get("rows", []):
        worst = r.get("skipped") or r.get("error") or f"{max(r.get('errors', {'-': 0}).values(), default=0):.1e}"
        lines.append(f"| {r['case']} | {'yes' if r['ok'] else '**NO**'} | {worst} |")
    lines += ["", "## Recurrent scans: timings (fwd+bwd, median of 3)", "", "| op | impl | T | dtype | B,H,D | ms |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results.get("scan_timing", []):
        value = f"{r['ms_median']:.2f}" if "ms_median" in r else r.get("skipped") or r.get("error")
        lines.append(f"| {r['op']} | {r['impl']} | {r['L']} | {r['dtype']} | {r['B,H,D']} | {value} |")
    return lines
