import itertools

import pytest
import torch

from lmtool.data import LMOrderedIterator
from lmtool.data.iterators import VARLEN_MAX_DEVIATION, VARLEN_MIN_LEN, VARLEN_STD

DATA = torch.arange(1_003)  # ids equal positions, so shifts and stream order are visible


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def same_segments(a, b):
    return len(a) == len(b) and all(
        torch.equal(x.inp, y.inp) and torch.equal(x.tgt, y.tgt) and x.first == y.first
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "batch_size,tgt_len", [(4, 10), (3, 7), (1, 1000)], ids=["B4-L10", "B3-L7", "B1-L1000"]
)
def test_segments_are_batch_first_shifted_and_contiguous(batch_size, tgt_len):
    """Segments are [B, L]; targets are inputs shifted by one; each row reads one contiguous stream."""
    it = LMOrderedIterator(DATA, batch_size, tgt_len)
    n = DATA.numel() // batch_size
    segments = list(it)
    assert len(segments) == len(it) == -(-(n - 1) // tgt_len)
    for seg in segments:
        assert seg.inp.shape == seg.tgt.shape and seg.inp.shape[0] == batch_size
        assert seg.inp.dtype == torch.long and seg.inp.shape[1] <= tgt_len
        assert torch.equal(seg.tgt, seg.inp + 1)  # DATA is arange: the next token is id + 1
    assert [s.first for s in segments] == [True] + [False] * (len(segments) - 1)
    rows = torch.cat([s.inp for s in segments] + [segments[-1].tgt[:, -1:]], dim=1)
    assert torch.equal(rows, DATA[: n * batch_size].view(batch_size, n))  # remainder dropped
    assert it.num_tokens == sum(s.tgt.numel() for s in segments) == batch_size * (n - 1)


def test_fixed_segments_have_tgt_len_except_the_last():
    """Without varlen every segment has tgt_len tokens except a shorter final one."""
    lengths = [s.inp.shape[1] for s in LMOrderedIterator(DATA, 4, 10)]
    assert lengths == [10] * 24 + [9]  # 250 tokens per stream -> 249 targets


def test_varlen_lengths_are_bounded_and_cover_each_target_once():
    """Varlen segments stay within [5, tgt_len + 15] (last may be shorter) and tile each stream."""
    it = LMOrderedIterator(torch.arange(20_000), 2, 20, varlen=True, seed=3)
    lengths = [s.inp.shape[1] for s in it]
    assert all(VARLEN_MIN_LEN <= n <= 20 + VARLEN_MAX_DEVIATION * VARLEN_STD for n in lengths[:-1])
    assert 1 <= lengths[-1] and sum(lengths) == it.stream_len - 1
    assert len(set(lengths)) > 10 and min(lengths) < 15  # genuinely variable, half-length draws occur


def test_varlen_is_reproducible_and_varies_with_seed_and_epoch():
    """The same seed gives the same cut points; another seed or epoch gives different ones."""
    a = LMOrderedIterator(DATA, 2, 12, varlen=True, seed=7)
    b = LMOrderedIterator(DATA, 2, 12, varlen=True, seed=7)
    c = LMOrderedIterator(DATA, 2, 12, varlen=True, seed=8)
    assert a.schedule(0) == b.schedule(0) and a.schedule(1) == b.schedule(1)
    assert a.schedule(0) != c.schedule(0) and a.schedule(0) != a.schedule(1)
    assert same_segments(list(a), list(b))


def test_iter_train_runs_over_epochs_and_flags_boundaries():
    """iter_train is endless; `first` marks the first segment of every epoch."""
    it = LMOrderedIterator(DATA, 4, 100)
    train = it.iter_train()
    segments = take(train, 3 * len(it))
    assert it.epoch == 3 and it.state_dict()["segment"] == len(it)  # rollover happens on the next draw
    assert [s.first for s in segments] == ([True] + [False] * (len(it) - 1)) * 3
    assert same_segments(segments[: len(it)], segments[len(it) : 2 * len(it)])


@pytest.mark.parametrize("varlen", [False, True], ids=["fixed", "varlen"])
@pytest.mark.parametrize("stop_after", [1, 7, 25, 26, 40], ids=lambda k: f"after{k}")
def test_resume_continues_with_identical_segments(varlen, stop_after, tmp_path):
    """state_dict/load_state_dict (through torch.save, weights_only) continue exactly, across epochs."""
    reference = take(LMOrderedIterator(DATA, 4, 10, varlen=varlen, seed=5).iter_train(), 80)
    first = LMOrderedIterator(DATA, 4, 10, varlen=varlen, seed=5)
    head = take(first.iter_train(), stop_after)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = LMOrderedIterator(DATA, 4, 10, varlen=varlen, seed=5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    tail = take(resumed.iter_train(), 80 - stop_after)
    assert same_segments(head + tail, reference)


def test_load_state_dict_rejects_other_settings():
    """A state saved with another batch size, segment length or seed is refused with a clear message."""
    state = LMOrderedIterator(DATA, 4, 10, varlen=True, seed=1).state_dict()
    for other in (LMOrderedIterator(DATA, 2, 10, varlen=True, seed=1), LMOrderedIterator(DATA, 4, 10)):
        with pytest.raises(ValueError, match="resume with the same"):
            other.load_state_dict(state)


@pytest.mark.parametrize("varlen", [False, True], ids=["fixed", "varlen"])
def test_stream_ranges_slice_the_global_batch(varlen):
    """Processes reading stream ranges together see exactly the single-process batch, row-sliced."""
    full = list(LMOrderedIterator(DATA, 6, 9, varlen=varlen, seed=2))
    parts = [
        list(LMOrderedIterator(DATA, 6, 9, varlen=varlen, seed=2, stream_range=r))
        for r in [(0, 2), (2, 5), (5, 6)]
    ]
    assert all(len(p) == len(full) for p in parts)
    for i, seg in enumerate(full):
        assert torch.equal(torch.cat([p[i].inp for p in parts]), seg.inp)
        assert torch.equal(torch.cat([p[i].tgt for p in parts]), seg.tgt)
        assert all(p[i].first == seg.first for p in parts)


def test_invalid_arguments_are_rejected():
    """Too little data, a bad stream range or non-integer data raise ValueError."""
    with pytest.raises(ValueError, match="too few"):
        LMOrderedIterator(torch.arange(5), 4, 2)
    with pytest.raises(ValueError, match="stream_range"):
        LMOrderedIterator(DATA, 4, 2, stream_range=(3, 5))
    with pytest.raises(ValueError, match="integer"):
        LMOrderedIterator(DATA.float(), 4, 2)
