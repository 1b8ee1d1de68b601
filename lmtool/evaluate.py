"""`lmtool-eval checkpoint=PATH split=valid|test mode=segment|carry|sliding`: score a split with a checkpoint.

Modes (see docs/evaluation.md):
  segment  non-overlapping segments of tgt_len over batch_size streams, each from a fresh state, except that a
           model with a segment memory (transformer_xl, or mem_len > 0) carries it, as Transformer-XL evaluates
  carry    each layer's state (fast weights, memory) carried across the whole split
  sliding  every token scored with exactly tgt_len tokens of context; batch_size windows per forward pass
Options: tgt_len, mem_len, clamp_len, same_length (override the run's model config before the model is built;
they are not part of the checkpoint's model signature), batch_size, device.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmtool.config import ConfigError, register_configs, validate
from lmtool.data import DatasetNotFoundError
from lmtool.models.build import build_model
from lmtool.models.registry import get_family
from lmtool.train.checkpoint import CheckpointError, load_checkpoint, load_weights
from lmtool.train.device import resolve_device
from lmtool.train.evaluation import evaluate
from lmtool.train.metrics import perplexity_fields
from lmtool.train.pretrained import checkpoint_corpus
from lmtool.train.sliding import sliding_window_nll

register_configs()

MODEL_OVERRIDES = ("mem_len", "clamp_len", "same_length")


def fields_of(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def run_config_for_eval(run_cfg: Any, cfg: Any) -> Any:
    """The training run's config with the evaluation's model overrides applied, validated."""
    run_cfg = copy.deepcopy(run_cfg)
    for key in MODEL_OVERRIDES:
        if cfg[key] is not None:
            if key not in fields_of(get_family(run_cfg.model.name).schema):
                raise ConfigError(f"this checkpoint's model ({run_cfg.model.name}) has no {key} to override")
            run_cfg.model[key] = cfg[key]
    try:
        validate(run_cfg)
    except ConfigError as err:
        raise ConfigError(f"this checkpoint's model does not accept the override: {err}") from None
    return run_cfg


def _check_options(cfg: Any) -> None:
    validate(cfg)
    if cfg.tgt_len is not None and cfg.tgt_len < 1:
        raise ConfigError(f"tgt_len must be at least 1, got {cfg.tgt_len}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")


def evaluate_checkpoint(cfg: Any) -> dict:
    """Evaluate `cfg.checkpoint` on `cfg.split`; returns the result dict and writes it as JSON beside it."""
    _check_options(cfg)
    path = Path(cfg.checkpoint)
    ckpt = load_checkpoint(path)
    run_cfg = run_config_for_eval(OmegaConf.create(ckpt["config"]), cfg)
    corpus = checkpoint_corpus(ckpt, run_cfg, path)
    device = resolve_device(cfg.device)
    model = build_model(run_cfg, len(corpus.vocab)).to(device)
    load_weights(model, ckpt, path)
    tgt_len = cfg.tgt_len or run_cfg.trainer.eval_tgt_len or run_cfg.trainer.tgt_len
    data = getattr(corpus, cfg.split)
    start = time.perf_counter()
    if cfg.mode == "sliding":
        loss, tokens = sliding_window_nll(model, data, tgt_len=tgt_len, batch_size=cfg.batch_size, device=device)
    else:
        loss, tokens = evaluate(
            model, data, batch_size=cfg.batch_size, tgt_len=tgt_len, carry=cfg.mode == "carry", device=device
        )
    seconds = time.perf_counter() - start
    m = run_cfg.model
    result = {
        "checkpoint": str(path),
        "split": cfg.split,
        "mode": cfg.mode,
        "tgt_len": tgt_len,
        "mem_len": m.get("mem_len", 0),
        "clamp_len": m.get("clamp_len", 0),
        "same_length": m.get("same_length", False),
        "batch_size": cfg.batch_size,
        "loss": loss,
        **perplexity_fields(loss, corpus.metric),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step": ckpt["step"],
    }
    out = path.with_name(f"{path.stem}.eval-{cfg.split}-{cfg.mode}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(result: dict) -> str:
    metric = "bpc" if "bpc" in result else "ppl"
    memory = f", mem_len {result['mem_len']}" if result["mem_len"] else ""
    return (
        f"{result['split']} {result['mode']} (tgt_len {result['tgt_len']}{memory}): loss {result['loss']:.4f} | "
        f"{metric} {result[metric]:.3f} | {result['tokens']} tokens | {result['tokens_per_s']:.0f} tokens/s"
    )


@hydra.main(config_path="pkg://lmtool.conf", config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        result = evaluate_checkpoint(cfg)
    except (ConfigError, DatasetNotFoundError, CheckpointError) as err:
        sys.exit(f"lmtool-eval: {err}")
    print(format_result(result))


def main() -> None:
    """Console script `lmtool-eval`."""
    _hydra_main()


if __name__ == "__main__":
    main()
