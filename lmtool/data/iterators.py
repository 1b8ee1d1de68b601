"""Ordered language-model iterator (Transformer-XL style), batch-first.

The token stream is cut into ``B`` contiguous streams (``data[:N*B].view(B, N)``, the remainder
dropped) and read left to right in segments, so segment ``t+1`` of stream ``b`` continues segment
``t``; a model can carry memory or fast weights across segments. Targets are the inputs shifted by one;
every position ``1..N-1`` of every stream is a target exactly once per pass.

Variable-length segments (Transformer-XL ``--varlen``): for each segment,
``bptt = tgt_len`` with probability 0.95, else ``tgt_len / 2``; then
``seq_len = clamp(int(normal(bptt, std=5)), 5, tgt_len + 3 * 5)`` (``int`` truncates toward zero).
The lengths of one epoch are drawn up front from a private ``torch.Generator`` seeded from
``(seed, epoch)``: every process of a distributed run and every resumed run gets the same cut points,
and a position is fully described by ``(epoch, segment index)``, so no generator state has to be saved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

VARLEN_LONG_PROB = 0.95  # probability of a full-length (tgt_len) mean; else tgt_len / 2
VARLEN_STD = 5  # std of the normal draw around the mean
VARLEN_MIN_LEN = 5  # shortest segment
VARLEN_MAX_DEVIATION = 3  # longest segment is tgt_len + VARLEN_MAX_DEVIATION * VARLEN_STD


class Segment(NamedTuple):
    """One step of data. ``inp``/``tgt``: ``[B, L]`` long, ``tgt[:, i]`` is the token after ``inp[:, i]``.

    ``first`` is True for the first segment of a pass (an epoch boundary): carried state must be reset.
    """

    inp: torch.Tensor
    tgt: torch.Tensor
    first: bool


class LMOrderedIterator:
    """Contiguous streams of ``data`` read in segments of ``tgt_len`` (or variable) tokens.

    Args:
        data: 1-D integer tensor of token ids (one split of a corpus; any integer dtype, segments are int64).
        batch_size: number of streams ``B`` of the *global* batch.
        tgt_len: segment length (the mean one with ``varlen``).
        varlen: Transformer-XL's variable segment lengths (training only; see the module docstring).
        seed: seeds the per-epoch length draws.
        stream_range: ``(start, stop)``: this process reads only streams ``start..stop-1`` of the ``B``
            (distributed data parallel); the streams are cut exactly as for a single process.

    ``iter(it)`` is one pass (evaluation; epoch 0 cut points). :meth:`iter_train` is endless over epochs
    and advances the position that :meth:`state_dict` / :meth:`load_state_dict` save and restore.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        tgt_len: int,
        *,
        varlen: bool = False,
        seed: int = 0,
        stream_range: tuple[int, int] | None = None,
    ) -> None:
        if data.dim() != 1 or data.dtype.is_floating_point or data.dtype == torch.bool:
            raise ValueError(f"data must be a 1-D integer tensor, got {data.dtype} {tuple(data.shape)}")
        if batch_size < 1 or tgt_len < 1:
            raise ValueError(f"batch_size and tgt_len must be >= 1, got {batch_size} and {tgt_len}")
        stream_len = data.numel() // batch_size
        if stream_len < 2:
            raise ValueError(
                f"{data.numel()} tokens are too few for batch_size={batch_size} (each stream needs 2 or more)"
            )
        start, stop = (0, batch_size) if stream_range is None else map(int, stream_range)
        if not 0 <= start < stop <= batch_size:
            raise ValueError(f"stream_range must be (start, stop) with 0 <= start < stop <= {batch_size}")
        streams = data[: stream_len * batch_size].view(batch_size, stream_len)
        # [B_local, N] in the corpus dtype (int16/int32, possibly memory-mapped): a view, no copy;
        # each segment is widened to int64 when it is cut
        self.streams = streams[start:stop]
        self.batch_size = batch_size
        self.tgt_len = tgt_len
        self.varlen = varlen
        self.seed = seed
        self.stream_range = (start, stop)
        self.stream_len = stream_len
        self._epoch = 0
        self._segment = 0  # index of the next segment iter_train yields
        self._cached: tuple[int, list[tuple[int, int]]] | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def num_streams(self) -> int:
        """Streams read by this process (``stop - start``)."""
        return self.streams.shape[0]

    @property
    def num_tokens(self) -> int:
        """Target tokens per pass on this process: ``num_streams * (stream_len - 1)``."""
        return self.num_streams * (self.stream_len - 1)

    def num_segments(self, epoch: int = 0) -> int:
        """Segments in one pass of ``epoch`` (the same for every epoch unless ``varlen``)."""
        return len(self.schedule(epoch))

    def __len__(self) -> int:
        return self.num_segments(0)

    @property
    def epoch(self) -> int:
        """Epoch of the next segment :meth:`iter_train` yields."""
        return self._epoch + (self._segment >= self.num_segments(self._epoch))

    # ------------------------------------------------------------------ iteration
    def schedule(self, epoch: int = 0) -> list[tuple[int, int]]:
        """``(start, length)`` of every segment of ``epoch``, as offsets into each stream."""
        epoch = epoch if self.varlen else 0  # fixed cut points are the same every epoch
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        total = self.stream_len - 1  # positions that have a next token
        if not self.varlen:
            plan = [(s, min(self.tgt_len, total - s)) for s in range(0, total, self.tgt_len)]
        else:
            plan = self._varlen_schedule(epoch, total)
        self._cached = (epoch, plan)
        return plan

    def segments(self, epoch: int = 0, start: int = 0) -> Iterator[Segment]:
        """One pass over ``epoch``'s segments from segment index ``start``; no state is changed."""
        plan = self.schedule(epoch)
        for i in range(start, len(plan)):
            yield self._segment_at(plan[i], first=i == 0)

    def __iter__(self) -> Iterator[Segment]:
        return self.segments(0)

    def iter_train(self) -> Iterator[Segment]:
        """Endless segments over epochs from the current position, advancing it as they are yielded.

        After ``next()`` returns a segment, :meth:`state_dict` points at the one after it. Use one such
        generator at a time: they share the position.
        """
        while True:
            plan = self.schedule(self._epoch)
            while self._segment < len(plan):
                i = self._segment
                self._segment += 1
                yield self._segment_at(plan[i], first=i == 0)
            self._epoch += 1
            self._segment = 0

    def to(self, device: torch.device | str) -> LMOrderedIterator:
        """Move this process's streams to ``device`` once, so segments are produced there."""
        self.streams = self.streams.to(device)
        return self

    def _segment_at(self, span: tuple[int, int], *, first: bool) -> Segment:
        s, n = span
        inp = self.streams[:, s : s + n].long().contiguous()
        tgt = self.streams[:, s + 1 : s + 1 + n].long().contiguous()
        return Segment(inp, tgt, first)

    def _varlen_schedule(self, epoch: int, total: int) -> list[tuple[int, int]]:
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        draws = total // VARLEN_MIN_LEN + 1  # enough segments even if every one were the shortest
        long_mean = torch.rand(draws, generator=gen, dtype=torch.float64) < VARLEN_LONG_PROB
        noise = torch.randn(draws, generator=gen, dtype=torch.float64)
        mean = torch.where(long_mean, float(self.tgt_len), self.tgt_len / 2.0)
        max_len = self.tgt_len + VARLEN_MAX_DEVIATION * VARLEN_STD
        lengths = (mean + VARLEN_STD * noise).trunc().clamp(VARLEN_MIN_LEN, max_len).long()
        starts = torch.cumsum(lengths, 0) - lengths
        keep = starts < total
        starts, lengths = starts[keep].tolist(), lengths[keep].tolist()
        return [(s, min(n, total - s)) for s, n in zip(starts, lengths, strict=True)]

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, next segment) plus the settings it is only valid for; plain ints/bools."""
        return {
            "epoch": self._epoch,
            "segment": self._segment,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "tgt_len": self.tgt_len,
            "varlen": self.varlen,
            "stream_len": self.stream_len,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; the data settings must match those it was saved with."""
        for key in ("seed", "batch_size", "tgt_len", "varlen", "stream_len"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data iterator state was saved with {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r}: resume with the same dataset and batch settings"
                )
        epoch, segment = int(state["epoch"]), int(state["segment"])
        if epoch < 0 or not 0 <= segment <= self.num_segments(epoch):
            raise ValueError(f"data iterator state has an invalid position: epoch={epoch}, segment={segment}")
        self._epoch, self._segment = epoch, segment


def _mix_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch); hashing keeps nearby pairs' streams unrelated."""
    digest = hashlib.sha256(f"lmtool.varlen:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
