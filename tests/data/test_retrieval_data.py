"""The synthetic retrieval generator: sequence layout and targets of both settings."""

from __future__ import annotations

import pytest
import torch

from lmtool.data.retrieval import last_values, sample_pairs, sample_queries, sequence_length


def brute_force_targets(keys: torch.Tensor, values: torch.Tensor, n_symbols: int) -> torch.Tensor:
    """Walk each sequence and keep the newest value of every key (-1 when a key never appears)."""
    out = torch.full((keys.shape[0], n_symbols), -1, dtype=torch.long)
    for b in range(keys.shape[0]):
        for key, value in zip(keys[b].tolist(), values[b].tolist(), strict=True):
            out[b, key] = value
    return out


def test_capacity_sequences_hold_every_key_and_value_once():
    """Setting 1: L = S, keys and values are permutations of the S symbols."""
    keys, values = sample_pairs("capacity", 13, 6, torch.Generator().manual_seed(0))
    assert keys.shape == values.shape == (6, 13)
    expected = torch.arange(13).expand(6, -1)
    assert torch.equal(keys.sort(1).values, expected) and torch.equal(values.sort(1).values, expected)
    assert not torch.equal(keys[0], keys[1])  # fresh permutations per sequence


def test_update_sequences_repeat_keys_and_target_the_last_occurrence():
    """Setting 2: L = 2 S pairs with replacement; the target of a key is the value of its last occurrence."""
    keys, values = sample_pairs("update", 9, 64, torch.Generator().manual_seed(1))
    assert keys.shape == (64, sequence_length("update", 9)) == (64, 18)
    assert (keys.sort(1).values.diff(dim=1) == 0).any(1).all()  # every sequence has a repeated key
    assert torch.equal(last_values(keys, values, 9), brute_force_targets(keys, values, 9))


def test_last_values_by_hand():
    """A key written twice returns the second value; an absent key returns -1."""
    keys, values = torch.tensor([[2, 0, 2, 1]]), torch.tensor([[5, 6, 7, 8]])
    assert last_values(keys, values, 4).tolist() == [[6, 8, 7, -1]]


@pytest.mark.parametrize("setting", ["capacity", "update"])
def test_training_queries_are_keys_of_the_sequence(setting):
    """The training query is one of the sequence's keys and its target the value of its last occurrence."""
    gen = torch.Generator().manual_seed(2)
    keys, values = sample_pairs(setting, 11, 32, gen)
    queries, targets = sample_queries(keys, values, 11, gen)
    assert queries.shape == targets.shape == (32, 1)
    assert (keys == queries).any(1).all()
    assert torch.equal(targets, brute_force_targets(keys, values, 11).gather(1, queries))


def test_unknown_setting_is_refused():
    """A misspelled setting names the valid ones."""
    with pytest.raises(ValueError, match="capacity"):
        sequence_length("capcity", 4)
