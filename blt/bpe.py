"""Byte-level BPE with the `tokenizers` library, for the `bpe` patcher and the token-LM baseline.

Bytes are mapped one-to-one onto the first 256 code points (Latin-1) before the tokenizer sees them,
so any byte string (binary or invalid UTF-8 included) is tokenized losslessly and every token covers
an exact byte span: token offsets are byte offsets.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from blt.tokenizer import BOS_ID, BPE_ID, OFFSET, to_bytes

# words with their leading space, numbers, punctuation runs, whitespace runs
PRETOKENIZE = r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"


def _as_text(data: bytes) -> str:
    return data.decode("latin-1")


def train_bpe(texts: Iterable[str | bytes], vocab_size: int) -> Tokenizer:
    """Train a BPE tokenizer of `vocab_size` tokens (at least the 256 single bytes)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256),
        initial_alphabet=[chr(i) for i in range(256)],
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator((_as_text(to_bytes(t)) for t in texts), trainer)
    return tokenizer


def load_bpe(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def token_spans(tokenizer: Tokenizer, data: str | bytes) -> list[tuple[int, int]]:
    """Byte spans [start, end) of the tokens of `data`, covering it exactly."""
    return tokenizer.encode(_as_text(to_bytes(data))).offsets


def token_ids(tokenizer: Tokenizer, data: str | bytes) -> list[int]:
    return tokenizer.encode(_as_text(to_bytes(data))).ids


def encode_with_delimiters(tokenizer: Tokenizer, data: str | bytes, bos: bool = True) -> list[int]:
    """Byte ids with the BPE delimiter (id 3) before every token, as the release's `bpe` mode writes them.

    The delimiter is part of the sequence the model reads and predicts; the `bpe` patcher starts a
    patch right after each one, which only looks at earlier ids (patching stays incremental).
    """
    raw = to_bytes(data)
    ids = [BOS_ID] if bos else []
    for start, end in token_spans(tokenizer, raw):
        ids.append(BPE_ID)
        ids.extend(b + OFFSET for b in raw[start:end])
    return ids
