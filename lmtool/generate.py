"""`lmtool-generate checkpoint=PATH prompt="the company said"`: continue a prompt with a trained model.

The continuation is streamed to stdout as it is produced, detokenised for the corpus (word level: words
joined by spaces, `<eos>` as a line break; character level: the characters, the end-of-line symbol as a line
break). One line on stderr then says how many tokens were generated and how fast. Python API:

    from lmtool.generate import load_pretrained, generate_text
    pretrained = load_pretrained("outputs/.../checkpoints/best.pt")
    print(generate_text(pretrained, "the company said", max_new_tokens=50, temperature=0.8))
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from lmtool.config import ConfigError, register_configs, validate
from lmtool.data import DatasetNotFoundError, Vocab
from lmtool.data.vocab import DEFAULT_EOL
from lmtool.models.generation import Context, default_context, stream
from lmtool.train.checkpoint import CheckpointError
from lmtool.train.pretrained import Pretrained, load_pretrained

__all__ = ["encode_prompt", "generate_text", "load_pretrained", "stream_text"]

register_configs()


def encode_prompt(text: str, vocab: Vocab, level: str) -> tuple[list[int], list[str]]:
    """Token ids of `text` and the prompt words missing from the vocabulary (mapped to `<unk>`).

    Word level: whitespace-separated words, a line break as the end-of-line symbol. Character level: one
    token per character, a line break as the end-of-line symbol; spaces become `_` in corpora that join words
    with it (PTB characters)."""
    lines = text.split("\n")
    tokens: list[str] = []
    for i, line in enumerate(lines):
        if level == "char":
            tokens += list(line.replace(" ", "_") if " " not in vocab and "_" in vocab else line)
        else:
            tokens += line.split()
        if i < len(lines) - 1:
            tokens.append(DEFAULT_EOL)
    missing = sorted({t for t in tokens if t not in vocab})
    if missing and (vocab.unk is None or level == "char"):
        raise ConfigError(f"the prompt has symbols this model's vocabulary lacks: {' '.join(map(repr, missing))}")
    return vocab.encode(tokens), missing


class Detokenizer:
    """Turns generated ids into text pieces as they come."""

    def __init__(self, vocab: Vocab, level: str) -> None:
        self.symbols, self.level = vocab.symbols, level
        self.space = level == "char" and " " not in vocab and "_" in vocab
        self.line_start = True

    def piece(self, token_id: int) -> str:
        sym = self.symbols[token_id]
        if sym == DEFAULT_EOL:
            self.line_start = True
            return "\n"
        if self.level == "char":
            return " " if self.space and sym == "_" else sym
        text = sym if self.line_start else " " + sym
        self.line_start = False
        return text


def stream_text(pretrained: Pretrained, prompt: str, *, max_new_tokens: int = 100, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_context: int | None = None,
                cache: bool = True) -> Iterator[str]:  # fmt: skip
    """Yield the text pieces of one sampled continuation of `prompt` (see `lmtool.models.generation`)."""
    ids, _ = encode_prompt(prompt, pretrained.vocab, pretrained.level)
    context = checked_context(pretrained, ids, max_new_tokens, temperature, top_k, top_p, max_context)
    yield from _pieces(pretrained, ids, context, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, cache=cache)  # fmt: skip


def _pieces(pretrained: Pretrained, ids: list[int], context: Context, *, seed: int, **options: Any) -> Iterator[str]:
    """The text pieces of one continuation of the checked prompt `ids`."""
    device = next(pretrained.model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    detok = Detokenizer(pretrained.vocab, pretrained.level)
    for token in stream(pretrained.model, torch.tensor([ids], device=device), context=context, generator=generator,
                        **options):  # fmt: skip
        yield detok.piece(int(token[0]))


def generate_text(pretrained: Pretrained, prompt: str, **options: Any) -> str:
    """One sampled continuation of `prompt` as a string (options as `stream_text`)."""
    return "".join(stream_text(pretrained, prompt, **options))


def checked_context(pretrained: Pretrained, ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
                    top_p: float, max_context: int | None) -> Context:  # fmt: skip
    """The context to decode with, after refusing bad options with a one-line ConfigError."""
    if not ids:
        raise ConfigError("the prompt is empty: give prompt=TEXT or prompt_file=PATH with at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be at least 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be at least 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    try:
        return default_context(pretrained.model, pretrained.tgt_len, max_context)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def read_prompt(cfg: Any) -> str:
    if (cfg.prompt is None) == (cfg.prompt_file is None):
        raise ConfigError("give exactly one of prompt=TEXT and prompt_file=PATH")
    if cfg.prompt_file is None:
        return str(cfg.prompt)
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise ConfigError(f"prompt_file {path} does not exist")
    return path.read_text(encoding="utf-8").rstrip("\n")


def run(cfg: Any) -> None:
    """Print `cfg.num_samples` continuations to stdout as they are produced, and the speed to stderr."""
    validate(cfg)
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {cfg.num_samples}")
    prompt = read_prompt(cfg)
    pretrained = load_pretrained(cfg.checkpoint, cfg.device)
    ids, missing = encode_prompt(prompt, pretrained.vocab, pretrained.level)
    context = checked_context(pretrained, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                              cfg.max_context)  # fmt: skip
    if missing:
        print(f"lmtool-generate: not in the vocabulary, read as {pretrained.vocab.unk}: {' '.join(missing)}",
              file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"{'' if i == 0 else chr(10)}=== sample {i + 1} ===", flush=True)
        for piece in _pieces(pretrained, ids, context, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + i, cache=cfg.cache):  # fmt: skip
            print(piece, end="", flush=True)
        print(flush=True)
    seconds = time.perf_counter() - start
    n = cfg.max_new_tokens * cfg.num_samples
    print(f"generated {n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s) after a {len(ids)}-token prompt",
          file=sys.stderr)  # fmt: skip


@hydra.main(config_path="pkg://lmtool.conf", config_name="generate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, CheckpointError, DatasetNotFoundError) as err:
        sys.exit(f"lmtool-generate: {err}")


def main() -> None:
    """Console script `lmtool-generate`."""
    _hydra_main()


if __name__ == "__main__":
    main()
