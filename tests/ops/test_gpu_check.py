"""scripts/gpu_check.py's own logic, on the CPU (--cpu-dry-run: impl="chunk", tiny sizes)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_markdown_report(tmp_path):
    """Parity rows (both rules, both dtypes, with and without g; the three recurrent scans), timing rows and a short
    training run whose first metrics row records the form that ran; report.md and gpu_check.json are written and the
    exit status is 0."""
    gpu_check = load_script("gpu_check")
    rc = gpu_check.main(["--out", str(tmp_path), "--cpu-dry-run", "--train-steps", "3", "--skip-sanitize"])
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, results
    rows = results["parity"]["rows"]
    assert all(r["ok"] for r in rows) and {r["case"].split()[0] for r in rows} == {"delta_rule", "sum_rule"}
    assert any(" g " in r["case"] for r in rows) and any("bf16" in r["case"] for r in rows)
    assert {r["op"] for r in results["timing"] if "ms_median" in r} == {"delta_rule", "delta_rule+g", "sum_rule"}
    scans = results["scan_parity"]["rows"]
    assert all(r["ok"] for r in scans)
    assert {r["case"].split()[0] for r in scans} == {"delta_rnn_scan", "delta_lstm_scan", "rec_delta_scan", "srwm_scan"}
    assert any("carried halves" in r["case"] for r in scans) and any("bf16" in r["case"] for r in scans)
    assert {r["op"] for r in results["scan_timing"] if "ms_median" in r} == {r["case"].split()[0] for r in scans}
    assert results["train"]["ok"] and results["train"]["impls"] == {"delta_rule": ["chunk"]}
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# lmtool GPU check") and "## Parity against float64" in report
    assert "| delta_rule | chunk | 64 | fp32 |" in report and "## Recurrent scans: parity against float64" in report
