"""scripts/bench_ops.py runs end to end on a tiny grid, with and without a decay, and reports sane rows."""

from __future__ import annotations

import json

from tests.helpers import load_script


def test_bench_ops_reports_decayed_and_plain_rows(capsys):
    """One row per op and mode with positive times and FLOP rates; "+g" rows count the op's useful FLOPs."""
    bench = load_script("bench_ops")
    argv = ["--grid", "small", "--ops", "delta_rule,delta_rule+g,sum_rule+g", "--impls", "chunk", "--repeats", "1"]
    bench.main([*argv, "--json", "--modes", "fwd+bwd"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["op"] for r in rows] == ["delta_rule", "delta_rule+g", "sum_rule+g"]
    for r in rows:
        assert r["ms_median"] > 0 and r["pct_of_matmul_peak"] > 0
        flops = (18 if r["op"].startswith("delta") else 12) * r["B"] * r["H"] * r["L"] * r["Dk"] * r["Dv"]
        assert abs(r["useful_gflops"] - flops / (r["ms_median"] / 1e3) / 1e9) <= 1e-6 * r["useful_gflops"]


def test_bench_ops_decay_ratio_in_alternating_pairs(capsys):
    """--decay-ratio times each op with and without a decay in pairs and reports the median ratio and quartiles."""
    bench = load_script("bench_ops")
    bench.main(["--grid", "small", "--impls", "chunk", "--repeats", "3", "--decay-ratio", "--json"])
    results = json.loads(capsys.readouterr().out)["decay_ratios"]
    assert [r["op"] for r in results] == ["delta_rule", "sum_rule"]
    assert all(r["pairs"] == 3 and 0 < r["ratio_q1"] <= r["ratio_median"] <= r["ratio_q3"] for r in results)
