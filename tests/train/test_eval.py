"""lmtool-eval on a tiny trained checkpoint: segment, carry and sliding modes, model overrides, bad options."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lmtool.config import ConfigError
from lmtool.evaluate import evaluate_checkpoint
from lmtool.models.build import build_model
from lmtool.train.loop import Trainer
from lmtool.train.sliding import sliding_window_nll
from tests.helpers import SMOKE, compose_config
from tests.train.test_sliding import one_window_at_a_time

QUICK = (*SMOKE, "trainer.final_eval=false", "trainer.max_steps=2", "trainer.eval_interval=2",
         "trainer.eval_max_segments=1")
VALID_TOKENS = 2001  # the first tokens of PTB valid: evaluation tests take seconds, not minutes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """best.pt of a smoke-sized delta-rule model and of a smoke-sized Transformer-XL (memory 16), trained on PTB."""
    root = tmp_path_factory.mktemp("eval")
    runs = {"fwm": ("model=fwm",), "transformer_xl": ("model=transformer_xl", "model.mem_len=16")}
    for name, overrides in runs.items():
        Trainer(compose_config(*QUICK, *overrides), root / name).fit()
    return {name: root / name / "checkpoints" / "best.pt" for name in runs}


@pytest.fixture(autouse=True)
def short_valid(monkeypatch):
    """lmtool-eval reads a corpus whose valid split is its first VALID_TOKENS tokens."""
    import lmtool.train.pretrained

    load_corpus = lmtool.train.pretrained.load_corpus

    def load_short(*args, **kwargs):
        corpus = load_corpus(*args, **kwargs)
        return dataclasses.replace(corpus, valid=corpus.valid[:VALID_TOKENS])

    monkeypatch.setattr(lmtool.train.pretrained, "load_corpus", load_short)


def eval_config(ckpt: Path, *overrides: str):
    return compose_config(f"checkpoint={ckpt}", "split=valid", "device=cpu", *overrides, config_name="eval")


@pytest.mark.parametrize("mode", ["segment", "carry", "sliding"])
def test_each_mode_scores_the_split_and_writes_json(checkpoints, mode):
    """Every mode returns a finite perplexity and writes the same result as JSON beside the checkpoint."""
    ckpt = checkpoints["fwm"]
    result = evaluate_checkpoint(eval_config(ckpt, f"mode={mode}", "tgt_len=8", "batch_size=32"))
    assert math.isfinite(result["ppl"]) and 1 < result["ppl"] < 20000
    assert result["tokens_per_s"] > 0 and result["tgt_len"] == 8 and result["mode"] == mode
    if mode == "sliding":  # every target of the split is scored exactly once
        assert result["tokens"] == VALID_TOKENS - 1
    else:  # 32 streams of 62 tokens, 61 targets each (the iterator drops the remainder of the split)
        assert result["tokens"] == 32 * (VALID_TOKENS // 32 - 1)
    written = json.loads((ckpt.parent / f"best.eval-valid-{mode}.json").read_text())
    assert written == pytest.approx(result)


def test_memory_overrides_apply_to_transformer_xl(checkpoints):
    """mem_len, clamp_len and same_length override the run's model config; the memory changes the loss."""
    ckpt = checkpoints["transformer_xl"]
    trained = evaluate_checkpoint(eval_config(ckpt, "tgt_len=8", "batch_size=4"))
    longer = evaluate_checkpoint(
        eval_config(ckpt, "tgt_len=8", "batch_size=4", "mem_len=32", "clamp_len=24", "same_length=true")
    )
    none = evaluate_checkpoint(eval_config(ckpt, "tgt_len=8", "batch_size=4", "mem_len=0"))
    assert trained["mem_len"] == 16
    assert (longer["mem_len"], longer["clamp_len"], longer["same_length"]) == (32, 24, True)
    assert none["mem_len"] == 0
    assert len({trained["loss"], longer["loss"], none["loss"]}) == 3


def test_memory_override_on_fast_weights_is_refused(checkpoints):
    """mem_len on a fast weight checkpoint fails with a one-line reason before any scoring."""
    with pytest.raises(ConfigError, match="mem_len") as err:
        evaluate_checkpoint(eval_config(checkpoints["fwm"], "mem_len=16"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["mode=windows", "tgt_len=0", "batch_size=0"])
def test_bad_option_is_refused(checkpoints, override):
    """An unknown mode or a non-positive length fails with a ConfigError that names the key."""
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        evaluate_checkpoint(eval_config(checkpoints["fwm"], override))


def test_bad_mode_on_the_command_line(tmp_path):
    """lmtool-eval with an unknown mode exits non-zero with one line naming the modes, no traceback."""
    proc = subprocess.run(
        ["lmtool-eval", f"checkpoint={tmp_path / 'none.pt'}", "mode=windows"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert proc.returncode != 0
    assert "segment, carry, sliding" in proc.stderr and "Traceback" not in proc.stderr


def test_sliding_with_adaptive_softmax_and_memory_matches_batch_one():
    """Batched sliding windows (softmax on the last position only) equal batch 1 for an adaptive Transformer-XL."""
    torch.manual_seed(0)
    cfg = compose_config("model=transformer_xl", "debug=smoke", "model.adaptive=true", "model.cutoffs=[10,30]",
                         "model.div_val=2")
    model = build_model(cfg, 61).double().eval()
    data = torch.randint(0, 61, (50,))
    loss, count = sliding_window_nll(model, data, tgt_len=8, batch_size=5, device=torch.device("cpu"))
    ref_loss, ref_count = one_window_at_a_time(model, data, 8)
    assert count == ref_count == 49
    assert loss == pytest.approx(ref_loss, rel=1e-10)


def test_carry_mode_refuses_a_growing_key_value_cache():
    """mode=carry on a softmax Transformer without memory would cache the whole split: refused in one line."""
    from lmtool.train.evaluation import evaluate

    model = build_model(compose_config("model=transformer", *SMOKE), 29)
    with pytest.raises(ConfigError, match="key/value cache") as err:
        evaluate(model, torch.arange(100) % 29, batch_size=2, tgt_len=8, carry=True, device=torch.device("cpu"))
    assert "\n" not in str(err.value)
