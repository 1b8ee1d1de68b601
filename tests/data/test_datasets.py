"""Each downloadable dataset, prepared from a tiny archive with the real layout, has the documented splits."""

import re
import zipfile
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from lmtool.config import DatasetConfig
from lmtool.data import LMOrderedIterator, download, readers
from lmtool.prepare import prepare
from tests.data import archives


def dataset_cfg(name, tmp_path, mirror, **overrides):
    return OmegaConf.structured(
        DatasetConfig(
            name=name, data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), url=str(mirror), **overrides
        )
    )


@pytest.fixture
def mirror(tmp_path):
    path = tmp_path / "mirror"
    path.mkdir()
    return path


@pytest.fixture
def small_heldout(monkeypatch):
    """enwik8/text8 hold out 2 x 5M characters; the fixtures hold out 2 x 100."""
    monkeypatch.setattr(readers, "HELDOUT_CHARS", 100)
    return 100


@pytest.mark.parametrize("name", ["wt2", "wt103"])
def test_wikitext_lines_vocabulary_and_counts(name, tmp_path, mirror, monkeypatch):
    """WikiText: every line (blank ones too) is its tokens + <eos>; the vocabulary is <eos> + train words."""
    text = archives.build_wikitext(mirror, name)
    archives.pin(monkeypatch, name, mirror)
    corpus = prepare(dataset_cfg(name, tmp_path, mirror), log=lambda msg: None)
    expected = {split: archives.wikitext_lines(text[split]) for split in ("train", "valid", "test")}
    for split, lines in expected.items():
        tokens = [tok for line in lines for tok in line]
        decoded = corpus.vocab.decode(corpus.split(split))
        if split == "train":
            assert decoded == tokens
        else:  # words never seen in train are <unk>
            assert decoded == [tok if tok in corpus.vocab else "<unk>" for tok in tokens]
    train_types = {tok for line in expected["train"] for tok in line}
    assert corpus.vocab.symbols[0] == "<eos>" and set(corpus.vocab.symbols) == train_types
    assert corpus.train.numel() == 65 and int((corpus.train == 0).sum()) == 9  # 9 lines, 4 of them blank
    assert corpus.vocab.decode(corpus.valid[:6]) == ["<eos>", "=", "<unk>", "<unk>", "=", "<eos>"]
    assert (corpus.level, corpus.metric) == ("word", "ppl")


def test_enwik8_is_one_symbol_per_byte(tmp_path, mirror, monkeypatch, small_heldout):
    """enwik8: train | valid | test = all but the last 2 x N bytes | N | N; every byte, newline included."""
    data = archives.build_enwik8(mirror, 1_000)
    archives.pin(monkeypatch, "enwik8", mirror)
    corpus = prepare(dataset_cfg("enwik8", tmp_path, mirror), log=lambda msg: None)
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (800, 100, 100)
    for split, part in [("train", data[:800]), ("valid", data[800:900]), ("test", data[900:])]:
        assert bytes(map(ord, corpus.vocab.decode(corpus.split(split)))) == part
    assert sorted(corpus.vocab.symbols) == sorted({chr(b) for b in data})
    assert "\n" in corpus.vocab and chr(0xC3) in corpus.vocab  # newline and the UTF-8 lead byte of ü
    assert corpus.vocab.unk is None and (corpus.level, corpus.metric) == ("char", "bpc")


def test_text8_writes_space_as_underscore(tmp_path, mirror, monkeypatch, small_heldout):
    """text8: 800 / 100 / 100 characters of a 1,000-character file, space as '_', no other symbols."""
    data = archives.build_text8(mirror, 1_000).decode("ascii")
    archives.pin(monkeypatch, "text8", mirror)
    corpus = prepare(dataset_cfg("text8", tmp_path, mirror), log=lambda msg: None)
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (800, 100, 100)
    assert "".join(corpus.vocab.decode(corpus.test)) == data[900:].replace(" ", "_")
    assert "".join(corpus.vocab.decode(corpus.train[:12])) == "_anarchism_o"  # the leading space is kept
    assert set(corpus.vocab.symbols) == set(data.replace(" ", "_")) and " " not in corpus.vocab
    assert (corpus.level, corpus.metric) == ("char", "bpc")


def test_lm1b_streams_sentences_with_the_fixed_vocabulary(tmp_path, mirror, monkeypatch):
    """lm1b: file vocabulary in file order; <S> opens the split and follows every sentence; valid == test."""
    shards, heldout = archives.build_lm1b(mirror)
    archives.pin(monkeypatch, "lm1b", mirror)
    corpus = prepare(dataset_cfg("lm1b", tmp_path, mirror), log=lambda msg: None)
    assert corpus.vocab.symbols == archives.LM1B_VOCAB and corpus.vocab.unk == "<UNK>"

    def stream(texts):
        out = ["<S>"]
        for text in texts:
            for line in text.splitlines():
                out += [w if w in archives.LM1B_VOCAB else "<UNK>" for w in line.split()] + ["<S>"]
        return out

    assert corpus.vocab.decode(corpus.train) == stream(shards)  # the 99 shards in name order
    assert corpus.vocab.decode(corpus.valid) == stream([heldout])  # held-out shard 00000 only
    assert torch.equal(corpus.valid, corpus.test)
    assert corpus.vocab.decode(corpus.valid) == "<S> the <UNK> said . <S> of a year , <S>".split()
    assert "</S>" not in corpus.vocab.decode(corpus.train) and corpus.vocab.index("</S>") == 1
    assert corpus.train.dtype == torch.int16 and (corpus.level, corpus.metric) == ("word", "ppl")


def test_lm1b_refuses_vocabulary_options(tmp_path, mirror, monkeypatch):
    """lm1b's vocabulary is the file: dataset.max_size is refused instead of silently ignored."""
    archives.build_lm1b(mirror)
    archives.pin(monkeypatch, "lm1b", mirror)
    with pytest.raises(ValueError, match="fixed vocabulary file"):
        prepare(dataset_cfg("lm1b", tmp_path, mirror, max_size=5), log=lambda msg: None)


def test_char_vocabulary_counts_every_split(tmp_path, mirror, monkeypatch, small_heldout):
    """enwik8/text8 count symbols on all three splits (Transformer-XL): a test-only byte still encodes."""
    data = b"a" * 800 + b"b" * 100 + b"z" * 100
    with zipfile.ZipFile(mirror / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)
    archives.pin(monkeypatch, "enwik8", mirror)
    corpus = prepare(dataset_cfg("enwik8", tmp_path, mirror), log=lambda msg: None)
    assert corpus.vocab.decode(corpus.test[:2]) == ["z", "z"]
    assert Counter(corpus.vocab.decode(corpus.train)) == {"a": 800}


def test_segments_of_narrow_corpora_are_long(tmp_path, mirror, monkeypatch, small_heldout):
    """Corpora keep int16 ids; the ordered iterator still yields int64 inputs and targets."""
    archives.build_text8(mirror, 1_000)
    archives.pin(monkeypatch, "text8", mirror)
    corpus = prepare(dataset_cfg("text8", tmp_path, mirror), log=lambda msg: None)
    assert corpus.train.dtype == torch.int16
    seg = next(iter(LMOrderedIterator(corpus.train, 4, 16)))
    assert seg.inp.dtype == seg.tgt.dtype == torch.long
    assert torch.equal(seg.inp[0], corpus.train[:16].long())


def test_lm1b_train_is_read_shard_by_shard(tmp_path):
    """read_lm1b opens a shard only when the previous one is exhausted: the 4 GB split is streamed."""
    first = tmp_path / "news.en-00001-of-00100"
    first.write_text("a b\nc\n")
    missing = tmp_path / "news.en-00002-of-00100"  # would raise if it were opened up front
    lines = readers.read_lm1b([tmp_path / "vocab", tmp_path / "heldout", first, missing], "train")
    assert [next(lines) for _ in range(3)] == [["<S>"], ["a", "b", "<S>"], ["c", "<S>"]]
    with pytest.raises(FileNotFoundError):
        next(lines)


def test_canonical_sources_are_the_transformer_xl_ones():
    """The default URLs are those of Transformer-XL's getdata.sh; sizes and digests are well-formed."""
    urls = {name: [r.url for r in remotes] for name, remotes in download.SOURCES.items()}
    assert urls["wt103"] == ["https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"]
    assert urls["wt2"] == ["https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"]
    assert urls["enwik8"] == ["http://mattmahoney.net/dc/enwik8.zip"]
    assert urls["text8"] == ["http://mattmahoney.net/dc/text8.zip"]
    assert urls["lm1b"] == [
        "https://github.com/rafaljozefowicz/lm/raw/master/1b_word_vocab.txt",
        "https://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz",
    ]
    for remotes in download.SOURCES.values():
        for remote in remotes:
            assert remote.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
    assert set(download.SOURCES) | {"ptb", "ptb_char"} == set(readers.READERS)
