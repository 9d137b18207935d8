"""Hash n-gram embeddings (paper §3.2.1): each byte's embedding is enriched with embeddings of the
n-grams ending at it, looked up by a rolling polynomial hash.

The hash is the release's, bit for bit: over the window [x_{t-n+1}, ..., x_t] of ids (left-padded with
id 0), h = sum_j x_{t-n+1+j} * prime^j in int64 with wraparound, i.e. the oldest byte times prime^0,
then h mod the table size (a non-negative remainder). Hash function i uses the i-th prime below and
has one table per n.
"""

from __future__ import annotations

import torch
from torch import nn

# The release's primes, one per hash function.
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)


def _powers(prime: int, n: int, device) -> torch.Tensor:
    """prime^0 .. prime^(n-1) in int64 with wraparound."""
    return torch.tensor(prime, dtype=torch.int64, device=device) ** torch.arange(n, device=device)


def ngram_hash(
    ids: torch.Tensor,
    n: int,
    prime: int,
    modulo: int,
    prefix: torch.Tensor | None = None,
    powers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hash of the n-gram ending at every position of `ids` [B, T] -> [B, T] in [0, modulo).

    `prefix` [B, >= n-1] holds the ids that precede `ids` (incremental decoding); by default the
    sequence is left-padded with id 0, as in the release.
    """
    batch = ids.shape[0]
    if prefix is None:
        prefix = ids.new_zeros(batch, n - 1)
    else:
        prefix = prefix[:, prefix.shape[1] - (n - 1) :] if n > 1 else prefix[:, :0]
    padded = torch.cat([prefix.long(), ids.long()], dim=1)
    windows = padded.unfold(1, n, 1)  # [B, T, n], oldest first
    if powers is None:
        powers = _powers(prime, n, ids.device)
    return (windows * powers).sum(-1) % modulo


class HashNgramEmbedding(nn.Module):
    """Sum of hash n-gram embeddings, one table per (hash function, n)."""

    def __init__(
        self, dim: int, ngram_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8), table_size: int = 30000, n_functions: int = 1
    ):
        super().__init__()
        if n_functions > len(HASH_PRIMES):
            raise ValueError(f"at most {len(HASH_PRIMES)} hash functions are defined, got {n_functions}")
        self.ngram_sizes = tuple(ngram_sizes)
        self.table_size = table_size
        self.n_functions = n_functions
        # table index = function * len(ngram_sizes) + position of n, as in the release
        self.tables = nn.ModuleList(nn.Embedding(table_size, dim) for _ in range(n_functions * len(self.ngram_sizes)))
        self._powers: dict = {}  # (function, n, device) -> prime powers, computed once

    @property
    def history(self) -> int:
        """How many preceding ids an incremental call needs."""
        return max(self.ngram_sizes, default=1) - 1

    def forward(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        out = None
        for f in range(self.n_functions):
            for j, n in enumerate(self.ngram_sizes):
                key = (f, n, ids.device)
                if key not in self._powers:
                    self._powers[key] = _powers(HASH_PRIMES[f], n, ids.device)
                h = ngram_hash(ids, n, HASH_PRIMES[f], self.table_size, prefix, self._powers[key])
                e = self.tables[f * len(self.ngram_sizes) + j](h)
                out = e if out is None else out + e
        return out
