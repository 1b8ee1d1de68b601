"""Autoregressive generation with cached state: one token per step, for every model family.

What the model reads when it predicts the next token is its `Context`:
  unbounded  the whole history. Fast weight models carry (S, z) per layer and advance one token in O(1)
             time and memory; the softmax Transformer keeps a key/value cache.
             Reference: one forward pass over all tokens.
  window     the last N tokens (models trained on independent segments of N tokens: that is their
             definition of a prediction). The state is reused while the context fits the window; once the
             window slides, the N tokens are recomputed from an empty state (positions restart with it).
             Reference: one forward pass over the last N tokens.
  memory     a segment memory (Transformer-XL, or the softmax Transformer with mem_len > 0): the prompt is
             read in segments of `length` tokens, then one token per step, each with the memory of the
             last mem_len inputs per layer, as Transformer-XL samples. Reference: that recurrence
             replayed from the first token at every step.
`cache=False` computes every step with the reference (slow; for checking). With temperature 0 (greedy)
cached and reference decoding give the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmtool.models.lm import CausalLM
from lmtool.models.state import LMState

CONTEXT_KINDS = ("unbounded", "window", "memory")


@dataclass(frozen=True)
class Context:
    """`kind` (unbounded | window | memory) and `length`: the window's N, or the memory model's prompt
    segment length."""

    kind: str
    length: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ValueError(f"context kind {self.kind!r} is not one of {', '.join(CONTEXT_KINDS)}")
        if self.kind != "unbounded" and self.length < 1:
            raise ValueError(f"a {self.kind} context needs a length of at least 1, got {self.length}")


def default_context(model: CausalLM, train_len: int, max_context: int | None = None) -> Context:
    """The context a trained model defines: its memory recurrence, the whole history for models trained
    with carried state, else a window of its training length. `max_context` overrides the window
    (0: unbounded); a memory model reads through its memory and takes no window."""
    if model.has_memory:
        if max_context is not None:
            raise ValueError(
                "max_context applies to models without a segment memory; this model reads its past through "
                f"its memory of mem_len={model.mem_len} tokens"
            )
        return Context("memory", train_len)
    if max_context is not None and max_context < 0:
        raise ValueError(f"max_context must be 0 (unbounded) or a window of at least 1 token, got {max_context}")
    if max_context == 0 or (max_context is None and model.carry_over):
        return Context("unbounded")
    return Context("window", max_context or train_len)


class CachedDecoder:
    """Feeds tokens to `model` and returns the next-token scores `[B, V]`, keeping the state between calls."""

    def __init__(self, model: CausalLM, context: Context, batch_size: int) -> None:
        self.model, self.context, self.batch_size = model, context, batch_size
        self.state: LMState = model.init_state(batch_size)
        self.window: torch.Tensor | None = None  # the tokens in the window (window context)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Append `ids [B, L]` to the sequence; scores for the token after them."""
        if self.context.kind == "memory":  # the recurrence: segments of `length`, each with the memory
            for segment in ids.split(self.context.length, dim=1):
                scores = self._advance(segment)
            return scores
        if self.context.kind == "window":
            n = self.context.length
            self.window = (ids if self.window is None else torch.cat([self.window, ids], dim=1))[:, -n:]
            if self.state.seen + ids.shape[1] > n:  # the window slides: recompute it from an empty state
                self.state = self.model.init_state(self.batch_size)
                return self._advance(self.window)
        return self._advance(ids)

    def _advance(self, ids: torch.Tensor) -> torch.Tensor:
        scores, self.state = self.model(ids, state=self.state, return_state=True, last_only=True)
        return scores[:, -1]


def reference_scores(model: CausalLM, tokens: torch.Tensor, prompt_len: int, context: Context) -> torch.Tensor:
    """Next-token scores `[B, V]` after `tokens [B, T]`, computed from scratch by the context's definition."""
    if context.kind == "unbounded":
        return model(tokens, last_only=True)[0][:, -1]
    if context.kind == "window":
        return model(tokens[:, -context.length :], last_only=True)[0][:, -1]
    replay = CachedDecoder(model, context, tokens.shape[0])
    scores = replay.feed(tokens[:, :prompt_len])
    for t in range(prompt_len, tokens.shape[1]):
        scores = replay.feed(tokens[:, t : t + 1])
    return scores


def filter_scores(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`scores [B, V]` with everything outside the top-k scores and outside the top-p nucleus set to -inf.

    top_k > 0 keeps exactly the k highest scores; top_p < 1 keeps the smallest set of highest-probability
    tokens whose total probability reaches top_p (always at least the most likely one)."""
    if top_k > 0 and top_k < scores.shape[-1]:
        kept = torch.topk(scores, top_k, dim=-1).indices
        scores = torch.full_like(scores, float("-inf")).scatter(-1, kept, scores.gather(-1, kept))
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter(-1, order, ordered)
    return scores


def sample(
    scores: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of `scores [B, V]`: the argmax for temperature 0, else a draw from the
    temperature-scaled, top-k / top-p filtered distribution."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(filter_scores(scores.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    model: CausalLM,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    context: Context,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids `[B]` after `prompt [B, P]`, `max_new_tokens` times (the model is put in
    evaluation mode)."""
    model.eval()
    prompt = prompt.to(next(model.parameters()).device)
    decoder = CachedDecoder(model, context, prompt.shape[0]) if cache else None
    tokens = prompt
    scores = decoder.feed(prompt) if decoder is not None else None
    for i in range(max_new_tokens):
        if decoder is None:
            scores = reference_scores(model, tokens, prompt.shape[1], context)
        token = sample(scores, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        if decoder is None:
            tokens = torch.cat([tokens, token[:, None]], dim=1)
        elif i < max_new_tokens - 1:
            scores = decoder.feed(token[:, None])


def generate(
    model: CausalLM, prompt: torch.Tensor, *, max_new_tokens: int, context: Context, **options
) -> torch.Tensor:
    """The `[B, max_new_tokens]` continuation of `prompt [B, P]` (options as `stream`)."""
    return torch.stack(list(stream(model, prompt, max_new_tokens=max_new_tokens, context=context, **options)), 1)
