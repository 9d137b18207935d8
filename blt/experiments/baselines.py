"""Baselines built from the same block, loop and data pipeline as BLT.

- `byte`: a flat byte transformer, the entropy-model architecture (`blt.EntropyModel`) over bytes.
- `bpe`: a Llama-style token LM, the same architecture over the tokens of a BPE tokenizer trained
  with `tokenizers` on the training split. Token t has id t + 4 (ids 0..3 stay BOE/BOS/EOS/unused,
  so documents are framed and masked exactly as byte streams are). It is scored in bits per byte of
  the original text: its bits are divided by the byte length of the tokens it predicted.
"""

from __future__ import annotations

import numpy as np
import torch

from blt.bpe import token_ids
from blt.config import EntropyModelConfig
from blt.tokenizer import BOS_ID, OFFSET
from blt.training.data import Document, build_stream


def token_stream(tokenizer, docs: list[Document]) -> np.ndarray:
    """Documents as BOS + token ids (+4) + EOS."""
    return build_stream(docs, lambda data: [BOS_ID] + [t + OFFSET for t in token_ids(tokenizer, data)])


def token_vocab_size(tokenizer) -> int:
    return tokenizer.get_vocab_size() + OFFSET


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """Bytes per id [vocab]: the byte length of each token (tokens are Latin-1 text, one char per byte)."""
    lengths = torch.zeros(token_vocab_size(tokenizer), dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        lengths[i + OFFSET] = len(token)
    return lengths


def lm_config(
    width: int, layers: int, heads: int, ffn_dim: int, vocab_size: int, window: int | None, max_seqlen: int
) -> EntropyModelConfig:
    """A byte or token LM of the entropy-model architecture."""
    return EntropyModelConfig(
        vocab_size=vocab_size,
        dim=width,
        n_layers=layers,
        n_heads=heads,
        ffn_dim=ffn_dim,
        sliding_window=window,
        max_seqlen=max_seqlen,
    )
