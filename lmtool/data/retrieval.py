"""Synthetic associative retrieval (Schlag, Irie & Schmidhuber 2021, arXiv 2102.11174, section 6.1).

S key symbols and S value symbols. A sequence is a list of (key, value) pairs followed by a query key;
the target is the value paired with the query's *last* occurrence in the sequence.

  capacity  L = S pairs: every key once, values a random permutation (sampled without replacement);
  update    L = 2 S pairs drawn with replacement, so keys repeat and the newest pairing wins.

The training query is one of the sequence's L keys picked uniformly over positions, as in the paper;
evaluation asks every key present in the sequence (`last_values` >= 0).
"""

from __future__ import annotations

import torch

SETTINGS = ("capacity", "update")


def sequence_length(setting: str, n_symbols: int) -> int:
    """Number of (key, value) pairs per sequence: S for capacity, 2 S for update."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown retrieval setting {setting!r}; choose one of {SETTINGS}")
    return n_symbols if setting == "capacity" else 2 * n_symbols


def sample_pairs(
    setting: str, n_symbols: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(keys, values)`, both `[batch_size, L]` int64 in `[0, n_symbols)`."""
    length = sequence_length(setting, n_symbols)
    if setting == "capacity":
        keys = torch.rand(batch_size, n_symbols, generator=generator).argsort(dim=1)
        values = torch.rand(batch_size, n_symbols, generator=generator).argsort(dim=1)
        return keys, values
    keys = torch.randint(n_symbols, (batch_size, length), generator=generator)
    values = torch.randint(n_symbols, (batch_size, length), generator=generator)
    return keys, values


def last_values(keys: torch.Tensor, values: torch.Tensor, n_symbols: int) -> torch.Tensor:
    """`[B, n_symbols]`: the value paired with each key's last occurrence, -1 for keys absent from the sequence."""
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(keys)
    last = torch.full((keys.shape[0], n_symbols), -1, dtype=torch.long, device=keys.device)
    last = last.scatter_reduce(1, keys, positions, reduce="amax")
    return torch.where(last >= 0, values.gather(1, last.clamp(min=0)), last)


def sample_queries(
    keys: torch.Tensor, values: torch.Tensor, n_symbols: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training query per sequence, `(query_keys, targets)` both `[B, 1]`: the key at a uniformly drawn
    position and the value of that key's last occurrence."""
    position = torch.randint(keys.shape[1], (keys.shape[0], 1), generator=generator)
    query = keys.gather(1, position)
    return query, last_values(keys, values, n_symbols).gather(1, query)
