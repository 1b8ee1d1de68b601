"""scripts/bench_train.py times real training steps of the default run's models and counts their useful FLOPs."""

from __future__ import annotations

import json

import torch

from tests.helpers import load_script


def test_bench_train_reports_every_configuration(capsys):
    """One row per model x precision x threads, with positive step times and FLOP rates, on the smoke sizes."""
    bench = load_script("bench_train")
    bench.main(["--override", "debug=smoke", "--threads", "1", "--steps", "1", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("default", "fp32"), ("default", "bf16"), ("fwm", "fp32"), ("fwm", "bf16"), ("transformer", "fp32"),
        ("transformer", "bf16"),
    ]  # fmt: skip
    assert all(r["ms_median"] > 0 and 0 < r["pct_of_mm_peak"] for r in rows)


def test_useful_flops_count_the_linear_maps_and_the_mixer():
    """Useful FLOPs per token: 6 x linear weights + 18 Dk Dv per head and layer for the delta rule."""
    bench = load_script("bench_train")
    case = bench.Case("fwm", ["debug=smoke"], "fp32", 1)
    m = case.cfg.model
    linear = sum(x.weight.numel() for x in case.model.modules() if isinstance(x, torch.nn.Linear))
    per_token = 6 * linear + m.n_layer * m.n_head * 18 * m.d_head**2
    assert case.flops == per_token * case.inp.numel()


def test_profile_prints_the_top_operators(capsys):
    """--profile N prints torch.profiler's operator table per configuration instead of the timing rows."""
    bench = load_script("bench_train")
    bench.main(["--override", "debug=smoke", "--models", "fwm", "--precisions", "fp32", "--threads", "1",
                "--profile", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("# fwm fp32 1 threads, 1 steps") and "aten::" in out
