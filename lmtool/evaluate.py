"""`lmtool-eval checkpoint=PATH split=valid|test mode=segment|carry`: score a split with a checkpoint."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmtool.config import ConfigError, register_configs, validate

register_configs()


def evaluate_checkpoint(cfg: Any) -> dict:
    """Evaluate `cfg.checkpoint` on `cfg.split`; returns the result dict and writes it as JSON beside it."""
    from lmtool.data import load_corpus
    from lmtool.models.build import build_model
    from lmtool.train.checkpoint import CheckpointError, load_checkpoint
    from lmtool.train.loop import evaluate, resolve_device
    from lmtool.train.metrics import perplexity_fields

    validate(cfg)
    path = Path(cfg.checkpoint)
    ckpt = load_checkpoint(path)
    run_cfg = OmegaConf.create(ckpt["config"])
    d = run_cfg.dataset
    corpus = load_corpus(d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, min_freq=d.min_freq, max_size=d.max_size)
    if corpus.vocab.fingerprint != ckpt["vocab"]["fingerprint"]:
        raise CheckpointError(f"checkpoint {path} does not match the vocabulary of dataset {d.name} on this machine")
    device = resolve_device(cfg.device)
    model = build_model(run_cfg, len(corpus.vocab)).to(device)
    model.load_state_dict(ckpt["model"])
    tgt_len = cfg.tgt_len or run_cfg.trainer.eval_tgt_len or run_cfg.trainer.tgt_len
    start = time.perf_counter()
    loss, tokens = evaluate(
        model,
        getattr(corpus, cfg.split),
        batch_size=cfg.batch_size,
        tgt_len=tgt_len,
        carry=cfg.mode == "carry",
        device=device,
    )
    seconds = time.perf_counter() - start
    result = {
        "checkpoint": str(path),
        "split": cfg.split,
        "mode": cfg.mode,
        "tgt_len": tgt_len,
        "loss": loss,
        **perplexity_fields(loss, corpus.metric),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step": ckpt["step"],
    }
    out = path.with_name(f"{path.stem}.eval-{cfg.split}-{cfg.mode}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(config_path="pkg://lmtool.conf", config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from lmtool.data import DatasetNotFoundError
    from lmtool.train.checkpoint import CheckpointError

    try:
        result = evaluate_checkpoint(cfg)
    except (ConfigError, DatasetNotFoundError, CheckpointError) as err:
        sys.exit(f"lmtool-eval: {err}")
    metric = "bpc" if "bpc" in result else "ppl"
    print(
        f"{result['split']} {result['mode']}: loss {result['loss']:.4f} | {metric} {result[metric]:.3f} | "
        f"{result['tokens']} tokens | {result['tokens_per_s']:.0f} tokens/s"
    )


def main() -> None:
    """Console script `lmtool-eval`."""
    _hydra_main()


if __name__ == "__main__":
    main()
