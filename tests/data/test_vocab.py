from collections import Counter

import pytest
import torch

from lmtool.data import Vocab, char_tokens

TOKENS = "b a c a b a d <unk> e e e".split()  # a:3 e:3 b:2 c:1 d:1 <unk>:1


def test_build_orders_specials_then_frequency_then_symbol():
    """Specials come first in the given order, then symbols by descending count with ties broken by symbol."""
    vocab = Vocab.build(TOKENS, specials=("<eos>", "<pad>"), unk=None)
    assert vocab.symbols == ["<eos>", "<pad>", "a", "e", "b", "<unk>", "c", "d"]


def test_build_is_independent_of_input_order():
    """The same counts in a different order give the same vocabulary and fingerprint."""
    shuffled = Counter(dict(reversed(list(Counter(TOKENS).items()))))
    assert Vocab.build(TOKENS).fingerprint == Vocab.build(shuffled).fingerprint


def test_min_freq_drops_rare_symbols_and_unk_is_reserved():
    """min_freq drops rare symbols; a dropped or absent unk is re-added right after the specials."""
    vocab = Vocab.build(TOKENS, specials=("<eos>",), min_freq=2)
    assert vocab.symbols == ["<eos>", "<unk>", "a", "e", "b"]
    assert vocab.unk_id == 1
    absent = Vocab.build(["x", "y", "x"], unk="<oov>")
    assert absent.symbols == ["<oov>", "x", "y"]


def test_present_unk_keeps_its_frequency_position():
    """An unk frequent enough to be kept stays where its count puts it."""
    vocab = Vocab.build("a a <unk> <unk> <unk> b".split(), specials=("<eos>",))
    assert vocab.symbols == ["<eos>", "<unk>", "a", "b"]
    vocab = Vocab.build("a a a <unk> <unk> b".split(), specials=("<eos>",))
    assert vocab.symbols == ["<eos>", "a", "<unk>", "b"]


def test_max_size_caps_the_total_including_specials_and_unk():
    """max_size counts every symbol; the most frequent others fill what the reserved ones leave."""
    vocab = Vocab.build(TOKENS, specials=("<eos>",), max_size=4)
    assert vocab.symbols == ["<eos>", "<unk>", "a", "e"]
    assert len(Vocab.build(TOKENS, max_size=100)) == 6
    with pytest.raises(ValueError, match="max_size"):
        Vocab.build(TOKENS, specials=("<eos>",), max_size=1)


def test_encode_maps_unknown_tokens_to_unk():
    """Unknown tokens encode to the unk id; decode inverts encode for known tokens."""
    vocab = Vocab.build(TOKENS)
    ids = vocab.encode(["a", "zzz", "b"])
    assert ids == [vocab.index("a"), vocab.unk_id, vocab.index("b")]
    assert vocab.decode(torch.tensor(ids)) == ["a", "<unk>", "b"]


def test_encode_without_unk_names_the_token():
    """A vocabulary without unk refuses unknown tokens with a ValueError naming them."""
    vocab = Vocab(["a", "b"])
    assert vocab.unk_id is None
    with pytest.raises(ValueError, match="'zzz'"):
        vocab.encode(["a", "zzz"])
    with pytest.raises(ValueError, match="'zzz'"):
        vocab.encode_lines([["a"], ["zzz"]])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.index("zzz")


def test_encode_lines_concatenates_into_a_long_tensor():
    """encode_lines returns one 1-D long tensor equal to the concatenated per-line encodings."""
    vocab = Vocab.build(TOKENS)
    lines = [["a", "b"], [], ["c", "nope"]]
    out = vocab.encode_lines(lines)
    assert out.dtype == torch.long and out.tolist() == vocab.encode(["a", "b", "c", "nope"])


def test_fingerprint_tracks_the_symbol_list():
    """Equal symbol lists share a fingerprint; adding, removing or reordering a symbol changes it."""
    base = Vocab(["<eos>", "a", "b"])
    assert base.fingerprint == Vocab(["<eos>", "a", "b"]).fingerprint
    assert len(base.fingerprint) == 64
    others = [Vocab(["<eos>", "b", "a"]), Vocab(["<eos>", "a"]), Vocab(["<eos>", "a", "b", "c"])]
    assert len({base.fingerprint, *(v.fingerprint for v in others)}) == 4


def test_state_dict_round_trips_through_weights_only_load(tmp_path):
    """state_dict is plain data that torch.load(weights_only=True) reads back into an equal vocabulary."""
    vocab = Vocab.build(TOKENS, specials=("<eos>",))
    torch.save(vocab.state_dict(), tmp_path / "v.pt")
    again = Vocab.from_state_dict(torch.load(tmp_path / "v.pt", weights_only=True))
    assert again == vocab and again.fingerprint == vocab.fingerprint and again.unk_id == vocab.unk_id


def test_duplicate_symbols_are_rejected():
    """A symbol list with a repeated symbol is an error, since ids must be unique."""
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["a", "b", "a"])


def test_char_vocabulary_has_eol_first_and_one_symbol_per_character():
    """build_chars puts the end-of-line symbol first, then each character, and has no unk."""
    vocab = Vocab.build_chars(["ab_a", "ba"], eol="<eos>")
    assert vocab.symbols == ["<eos>", "a", "b", "_"]
    assert vocab.unk_id is None
    assert char_tokens(["ab", "c"]) == ["a", "b", "_", "c", "<eos>"]
    assert vocab.encode(char_tokens(["ab", "a"])) == [1, 2, 3, 1, 0]
