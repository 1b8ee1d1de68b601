"""scripts/bench_models.py trains every model a few tiny steps and reports consistent rows."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script

TINY = ["--batch-size", "2", "--tgt-len", "3", "--vocab", "50", "--steps", "1", "--repeats", "2", "--warmup", "0"]



def test_bench_models_reports_every_model_against_the_delta_net(capsys):
    """One row per model (all of them by default) with steps from every round, tokens/s = tokens / median
    step time, the Delta Network's ratio 1, and the load averages before and after."""
    bench = load_script("bench_models")
    bench.main([*TINY, "--threads", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["model"] for r in rows] == bench.MODELS
    for r in rows:
        assert r["steps"] == 2 and r["ms_median"] > 0 and r["params"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 3 / (r["ms_median"] / 1e3))
    assert rows[0]["ratio_to_delta_net"] == 1.0
    assert all(r["ratio_to_delta_net"] > 0 for r in rows)
    assert len(result["load_before"]) == len(result["load_after"]) == 3 and result["threads"] == 1


def test_bench_models_table_without_the_baseline(capsys):
    """A subset without the Delta Network prints a table with no ratios and says why."""
    bench = load_script("bench_models")
    bench.main([*TINY, "--threads", "1", "--models", "lstm"])
    out, err = capsys.readouterr()
    assert "LSTM (lstm)" in out and "load average after" in out and "no ratios" in err


def test_bench_models_refuses_unknown_models():
    """An unknown model name is refused by the argument parser with the list of choices."""
    with pytest.raises(SystemExit):
        load_script("bench_models").main(["--models", "fwm,gpt"])
