"""Corpora: files -> documents -> a train/validation split -> one id stream -> packed sequences.

- Paths may be files, directories (read recursively, in sorted order) or glob patterns.
- `.jsonl` files hold one document per line in a `text` field; `.gz` files are decompressed; every
  other file is one document of raw bytes (binary and non-UTF-8 files are bytes too).
- Each document is framed as BOS + bytes + EOS. Sequences are cut from the concatenated stream, so a
  sequence may hold several documents; the models' document masks keep them apart.
- The split is deterministic: by document when there are enough documents, otherwise the tail of
  every document is held out (for a single file this is nanoGPT's "last 10%" split).
- Entropies of a whole stream are computed once, in batches, with each byte's document context, and
  cached on disk as a memory-mapped array keyed by the entropy model's weights and the stream.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blt.errors import BltError
from blt.tokenizer import BOS_ID, EOS_ID, OFFSET, encode

MIN_DOCS_FOR_DOC_SPLIT = 20


@dataclass
class Document:
    name: str
    data: bytes


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by `paths` (files, directories, globs), in a stable order."""
    files: list[Path] = []
    for p in paths:
        p = str(p)
        # a path that exists is that path, even with glob characters in its name; only others are globs
        literal = os.path.lexists(p) or not any(c in p for c in "*?[")
        matches = [p] if literal else sorted(glob.glob(p, recursive=True))
        if not matches:
            raise BltError(f"no file matches {p}")
        for m in map(Path, matches):
            if m.is_dir():
                found = sorted(
                    f
                    for f in m.rglob("*")
                    if f.is_file() and not any(part.startswith(".") for part in f.relative_to(m).parts)
                )
                if not found:
                    raise BltError(f"{m} is a directory with no documents in it")
                files.extend(found)
            elif m.is_file():
                files.append(m)
            else:
                raise BltError(f"{m}: no such file or directory")
    return files


MAX_FILE_BYTES = 1 << 32  # 4 GiB: larger files (or gzip files inflating beyond it) are refused


def _read_bytes(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise BltError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        with open(path, "rb") as f:  # in blocks: files such as /proc/... report no size
            blocks, size = [], 0
            while size <= MAX_FILE_BYTES and (block := f.read(1 << 24)):
                blocks.append(block)
                size += len(block)
            data = b"".join(blocks)
    except OSError as e:
        raise BltError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BltError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    if path.suffix == ".gz":
        data = _gunzip(path, data)
    return data


def _gunzip(path: Path, data: bytes) -> bytes:
    """Every member of a gzip file, refusing to inflate beyond MAX_FILE_BYTES (a gzip bomb)."""
    out, rest = [], data
    try:
        while rest:
            d = zlib.decompressobj(wbits=31)
            out.append(d.decompress(rest, MAX_FILE_BYTES + 1 - sum(map(len, out))))
            if d.unconsumed_tail or sum(map(len, out)) > MAX_FILE_BYTES:
                raise BltError(f"{path} inflates to more than {MAX_FILE_BYTES} bytes (a gzip bomb?)")
            if not d.eof:
                raise BltError(f"{path} is not a valid gzip file: truncated")
            rest = d.unused_data
    except zlib.error as e:
        raise BltError(f"{path} is not a valid gzip file: {e}") from None
    return b"".join(out)


def read_documents(
    paths: Sequence[str | os.PathLike], text_field: str = "text", max_bytes: int | None = None
) -> list[Document]:
    """The documents of `paths`. An empty file named on its own is an error; inside a directory it is skipped.

    Besides .txt / .jsonl / .gz files: Parquet files (the `text_field` column), a `datasets` folder written by
    `save_to_disk`, and `hf://datasets/NAME[:split]` (streamed with `datasets`, stopping after `max_bytes`)."""
    if not paths:
        raise BltError("no data paths given")
    docs: list[Document] = []
    files = []
    for p in paths:
        if str(p).startswith(HUB_DATASET):
            docs.extend(_hub_documents(str(p), text_field, max_bytes))
        elif Path(p).is_dir() and any((Path(p) / f).is_file() for f in ("state.json", "dataset_dict.json")):
            docs.extend(_saved_dataset_documents(Path(p), text_field))
        else:
            files.append(p)
    for path in expand_paths(files):
        if path.suffix == ".parquet":
            docs.extend(_parquet_documents(path, text_field))
            continue
        data = _read_bytes(path)
        inner = path.with_suffix("") if path.suffix == ".gz" else path
        if inner.suffix == ".jsonl":
            docs.extend(_jsonl_documents(path, data))
        elif data:
            docs.append(Document(str(path), data))
        elif str(path) in map(str, paths):
            raise BltError(f"{path} is empty")
    if max_bytes is not None:
        docs = _first_bytes(docs, max_bytes)
    if not docs:
        raise BltError(f"no documents found in {', '.join(map(str, paths))}")
    return docs


HUB_DATASET = "hf://datasets/"


def _first_bytes(docs: list[Document], max_bytes: int) -> list[Document]:
    """The leading documents up to `max_bytes` bytes in all (the last one cut)."""
    kept, total = [], 0
    for doc in docs:
        if total >= max_bytes:
            break
        kept.append(Document(doc.name, doc.data[: max_bytes - total]))
        total += len(kept[-1].data)
    return kept


def _text_documents(name: str, texts: Iterable, text_field: str, max_bytes: int | None = None) -> list[Document]:
    docs, total = [], 0
    for n, text in enumerate(texts):
        if max_bytes is not None and total >= max_bytes:
            break
        if text is None:
            continue
        if not isinstance(text, str):
            raise BltError(f"{name}: row {n}: the {text_field!r} column holds {type(text).__name__}, not text")
        if text:
            docs.append(Document(f"{name}:{n}", text.encode("utf-8", errors="surrogatepass")))
            total += len(docs[-1].data)
    return docs


def _parquet_documents(path: Path, text_field: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415  (optional dependency: the `data` extra)
    except ImportError as e:
        raise BltError(f"{path}: reading Parquet needs pyarrow (pip install 'blt[data]')") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise BltError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in table.column_names:
        raise BltError(
            f"{path} has no {text_field!r} column (columns: {', '.join(table.column_names)}; see --text-field)"
        )
    return _text_documents(str(path), table.column(text_field).to_pylist(), text_field)


def _saved_dataset_documents(path: Path, text_field: str) -> list[Document]:
    try:
        import datasets  # noqa: PLC0415  (optional dependency: the `data` extra)
    except ImportError as e:
        raise BltError(f"{path}: reading a saved dataset needs `datasets` (pip install 'blt[data]')") from e
    data = datasets.load_from_disk(str(path))
    splits = data.items() if isinstance(data, datasets.DatasetDict) else [("", data)]
    docs = []
    for split, ds in splits:
        if text_field not in ds.column_names:
            raise BltError(f"{path} has no {text_field!r} column (columns: {', '.join(ds.column_names)})")
        docs.extend(_text_documents(f"{path}{':' + split if split else ''}", ds[text_field], text_field))
    return docs


def _hub_documents(spec: str, text_field: str, max_bytes: int | None) -> list[Document]:
    try:
        import datasets  # noqa: PLC0415  (optional dependency: the `data` extra)
    except ImportError as e:
        raise BltError(f"{spec}: streaming a Hub dataset needs `datasets` (pip install 'blt[data]')") from e
    name, _, split = spec[len(HUB_DATASET) :].partition(":")
    try:
        stream = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown name, unknown split: datasets raises many kinds
        raise BltError(f"{spec}: could not open the Hub dataset ({e})") from None
    return _text_documents(spec, (row.get(text_field) for row in stream), text_field, max_bytes)


def _jsonl_documents(path: Path, data: bytes) -> list[Document]:
    docs = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BltError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise BltError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise BltError(f"{path}:{n}: no string 'text' field")
        if text:
            docs.append(Document(f"{path}:{n}", text.encode("utf-8", errors="surrogatepass")))
    return docs


def split_documents(
    docs: list[Document], val_fraction: float = 0.1, mode: str = "auto"
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split.

    `document`: a document goes to validation when a hash of its file name (without the folders above it, so that
    the same files read from another place split the same way) and content says so (about `val_fraction` of
    them); `tail`: the last `val_fraction` of every document's bytes, cut at a
    newline when one is near; `auto`: `document` with >= 20 documents, else `tail`.
    """
    if not 0 <= val_fraction < 1:
        raise BltError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if mode == "auto":
        mode = "document" if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT else "tail"
    if mode == "document":
        train, val = [], []
        for d in docs:
            key = os.path.basename(d.name).encode()
            h = int.from_bytes(hashlib.sha256(key + b"\0" + d.data).digest()[:8], "big")
            (val if h / 2**64 < val_fraction else train).append(d)
        if val_fraction > 0 and not val:
            val.append(train.pop())
        return train, val
    if mode != "tail":
        raise BltError(f"unknown split mode {mode!r}; use auto, document or tail")
    train, val = [], []
    for d in docs:
        cut = int(len(d.data) * (1 - val_fraction))
        if val_fraction > 0 and cut < len(d.data):
            train.append(Document(d.name, d.data[:cut]))
            val.append(Document(d.name + "#val", d.data[cut:]))
        else:
            train.append(d)
    return train, val


def build_stream(docs: list[Document], encode_doc: Callable[[bytes], Sequence[int]] | None = None) -> np.ndarray:
    """All documents framed as BOS ... EOS and concatenated: int16 ids [N]."""
    encode_doc = encode_doc or (lambda data: encode(data, bos=True, eos=False).tolist())
    parts = []
    for d in docs:
        ids = list(encode_doc(d.data))
        if not ids or ids[0] != BOS_ID:
            ids = [BOS_ID] + ids
        parts.append(np.asarray(ids + [EOS_ID], dtype=np.int16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def count_bytes(stream: np.ndarray) -> int:
    return int((stream >= OFFSET).sum())


class PackedSequences:
    """Non-overlapping windows of `seq_len` inputs (+1 target) over a stream."""

    def __init__(self, stream: np.ndarray, seq_len: int, entropies: np.ndarray | None = None):
        if len(stream) < seq_len + 1:
            raise BltError(
                f"the corpus holds {len(stream)} ids, fewer than one sequence of {seq_len} + 1; use a shorter "
                "--seq-len or more data"
            )
        self.stream, self.seq_len, self.entropies = stream, seq_len, entropies

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.stream[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in indices]
        chunk = torch.from_numpy(np.stack(rows).astype(np.int64))
        out = {"ids": chunk[:, :-1], "targets": chunk[:, 1:]}
        if self.entropies is not None:
            ent = [self.entropies[i * self.seq_len : (i + 1) * self.seq_len] for i in indices]
            out["entropies"] = torch.from_numpy(np.stack(ent).astype(np.float32))
        return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order sequences are visited in during `epoch`: a function of (seed, epoch) only, so a
    resumed run sees exactly what an uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, seed: int, position: int, count: int) -> list[int]:
    """`count` sequence indices starting at global `position` of the endless epoch-by-epoch order."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, n)
        take = min(count - len(out), n - offset)
        out.extend(epoch_order(n, seed, epoch)[offset : offset + take].tolist())
        position += take
    return out


# ---- entropies ----------------------------------------------------------------------------------
def _doc_spans(stream: np.ndarray) -> list[tuple[int, int]]:
    ends = np.flatnonzero(stream == EOS_ID) + 1
    starts = np.concatenate([[0], ends[:-1]])
    spans = list(zip(starts.tolist(), ends.tolist()))
    if len(stream) and (not spans or spans[-1][1] < len(stream)):
        spans.append((spans[-1][1] if spans else 0, len(stream)))
    return spans


@torch.no_grad()
def stream_entropies(
    entropy_model, stream: np.ndarray, chunk: int = 2048, batch_size: int = 8, progress: bool = False
) -> np.ndarray:
    """The entropy model's entropy at every position of `stream` [N] (float32), each byte seeing its
    document's preceding bytes (as far as the model's window and depth reach)."""
    cfg = entropy_model.config
    reach = cfg.n_layers * (cfg.sliding_window - 1) if cfg.sliding_window else chunk
    jobs = []  # (context start, first kept position, end)
    for a, b in _doc_spans(stream):
        for s in range(a, b, chunk):
            jobs.append((max(a, s - reach), s, min(b, s + chunk)))
    jobs.sort(key=lambda j: j[2] - j[0])
    out = np.zeros(len(stream), dtype=np.float32)
    device = next(entropy_model.parameters()).device
    from tqdm.auto import tqdm

    bar = tqdm(total=len(stream), desc="entropies", unit="B", unit_scale=True, disable=not progress, leave=False)
    for i in range(0, len(jobs), batch_size):
        group = jobs[i : i + batch_size]
        width = max(e - c for c, _, e in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for r, (c, _, e) in enumerate(group):
            ids[r, : e - c] = torch.from_numpy(stream[c:e].astype(np.int64))
        ent = entropy_model.entropies(ids.to(device)).float().cpu().numpy()
        for r, (c, s, e) in enumerate(group):
            out[s:e] = ent[r, s - c : e - c]
        bar.update(sum(e - s for _, s, e in group))
    bar.close()
    return out


def entropy_model_digest(entropy_model) -> str:
    h = hashlib.sha256(json.dumps(entropy_model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(entropy_model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_entropies(
    entropy_model, stream: np.ndarray, cache_dir: str | os.PathLike, progress: bool = False
) -> np.ndarray:
    """`stream_entropies`, computed once and memory-mapped from `cache_dir` afterwards."""
    key = entropy_model_digest(entropy_model) + "-" + hashlib.sha256(stream.tobytes()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"entropies-{key}.npy"
    if not path.exists():
        values = stream_entropies(entropy_model, stream, progress=progress)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise BltError(f"the cache folder {cache_dir} is a file")
        tmp = cache_dir / f".tmp-{path.stem}-{os.getpid()}.npy"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.save(tmp, values)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BltError(f"could not write the entropy cache {path}: {e.strerror or e}") from None
    return np.load(path, mmap_mode="r")
