"""The byte tokenizer: id = byte + 4, with four special ids below the bytes.

BLT has no learned vocabulary. The release reserves ids 0..3 for special symbols and shifts every
byte up by four, giving a 260-way vocabulary.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

import torch

from blt.errors import BltError

BOE_ID = 0  # beginning of example / padding
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3  # BPE delimiter, only used by the `bpe` patcher
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET


def to_bytes(text: str | bytes | bytearray) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", errors="surrogatepass")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise BltError(f"expected str or bytes, got {type(text).__name__}")


def encode(text: str | bytes, bos: bool = True, eos: bool = False) -> torch.Tensor:
    """UTF-8 bytes of `text` shifted by OFFSET, BOS first. Returns a LongTensor [T]."""
    data = to_bytes(text)
    ids = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + OFFSET
        if data
        else torch.empty(0, dtype=torch.long)
    )
    parts = ([torch.tensor([BOS_ID])] if bos else []) + [ids] + ([torch.tensor([EOS_ID])] if eos else [])
    return torch.cat(parts)


def ids_to_bytes(ids: Iterable[int] | torch.Tensor) -> bytes:
    """The bytes among `ids`; special ids are dropped."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return bytes(i - OFFSET for i in ids if OFFSET <= i < VOCAB_SIZE)


def decode(ids: Iterable[int] | torch.Tensor) -> str:
    """Text of `ids`. Never raises: special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    return ids_to_bytes(ids).decode("utf-8", errors="replace")


def encode_batch(
    texts: Sequence[str | bytes], bos: bool = True, pad_id: int = BOE_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and the true lengths [B].

    Right padding is safe for every BLT computation: everything is causal, so the logits and
    patches of real positions never depend on what follows them.
    """
    rows = [encode(t, bos=bos) for t in texts]
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.full((len(rows), int(lengths.max()) if rows else 0), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


class StreamDecoder:
    """Incremental UTF-8 decoding: an incomplete multi-byte character is held back until complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes | Iterable[int] | torch.Tensor, ids: bool = False) -> str:
        """Decode more bytes (or ids when `ids=True`); returns the text that is complete so far."""
        if ids:
            data = ids_to_bytes(data)
        return self._decoder.decode(bytes(data), final=False)

    def flush(self) -> str:
        """Whatever is still held back, with an incomplete character rendered as U+FFFD."""
        return self._decoder.decode(b"", final=True)
