"""The comparison scripts: bench_train_compare pairs rounds of two checkouts; bench_train_ablation runs its cases."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import load_script


def test_ratios_are_paired_by_round_and_the_order_alternates(monkeypatch, capsys):
    """Each round runs both checkouts (baseline first in even rounds); ratios are this / baseline per round."""
    compare = load_script("bench_train_compare")
    calls, speeds = [], {"base": iter([100.0, 100.0, 200.0]), "this": iter([150.0, 300.0, 200.0])}

    def fake_run(checkout, extra):
        who = "base" if checkout == Path("/b") else "this"
        calls.append(who)
        row = {"model": "fwm", "precision": "fp32", "threads": 1, "tokens_per_s": next(speeds[who])}
        return {"meta": {"load_avg_before": [1.0], "load_avg_after": [2.0]}, "rows": [row]}

    monkeypatch.setattr(compare, "run", fake_run)
    compare.main(["--baseline", "/b", "--rounds", "3"])
    assert calls == ["base", "this", "this", "base", "base", "this"]
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:5] == ["fwm", "fp32", "1", "100", "200"] and row[5] == "1.50"  # ratios 1.5, 3.0, 1.0


def test_ablation_runs_every_case(capsys, tmp_path):
    """bench_train_ablation steps all four cases on the smoke sizes, the 'old output' loaded from a checkout's file."""
    (tmp_path / "lmtool" / "layers").mkdir(parents=True)
    here = Path(__file__).resolve().parents[2]
    (tmp_path / "lmtool" / "layers" / "output.py").write_text((here / "lmtool/layers/output.py").read_text())
    ablation = load_script("bench_train_ablation")
    ablation.main(["--baseline", str(tmp_path), "--threads", "1", "--steps", "2", "--override", "debug=smoke"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["all", "old", "nn", "loop"]
