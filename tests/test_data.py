import gzip
import json
import os

import numpy as np
import pytest
import torch

import blt
from blt.tokenizer import BOS_ID, EOS_ID
from blt.training.data import (
    PackedSequences,
    batch_indices,
    build_stream,
    cached_entropies,
    read_documents,
    split_documents,
    stream_entropies,
)
from tests.helpers import TEXT, random_entropy_model


def test_reads_files_dirs_globs_jsonl_gz_and_binary(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n"
    )
    (tmp_path / "sub" / "c.txt.gz").write_bytes(gzip.compress(b"delta"))
    (tmp_path / "sub" / "d.bin").write_bytes(b"\xff\x00\xfe")
    (tmp_path / "sub" / "e.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": "epsilon"}).encode()))
    docs = read_documents([tmp_path])
    assert [d.data for d in docs] == [b"alpha", b"beta", b"gamma", b"delta", b"\xff\x00\xfe", b"epsilon"]
    assert [d.data for d in read_documents([str(tmp_path / "sub" / "*.txt.gz")])] == [b"delta"]


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "no such file or directory"),
        (lambda p: write(p / "empty.txt", ""), "empty.txt is empty"),
        (lambda p: (p / "d").mkdir() or p / "d", "is a directory with no documents"),
        (lambda p: str(p / "*.nothing"), "no file matches"),
        (lambda p: write(p / "bad.jsonl", "{oops\n"), "bad.jsonl:1: not a JSON line"),
        (lambda p: write(p / "x.jsonl", '{"body": "t"}\n'), "no string 'text' field"),
    ],
)
def test_bad_data_is_named(tmp_path, make, message):
    with pytest.raises(blt.BltError, match=message):
        read_documents([make(tmp_path)])


def test_directory_of_empty_files_has_no_documents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "e.txt").write_text("")
    with pytest.raises(blt.BltError, match="no documents found"):
        read_documents([tmp_path / "d"])


def test_split_is_deterministic_by_document_or_tail():
    docs = [blt.training.data.Document(f"doc{i}", f"text number {i} ".encode() * 5) for i in range(50)]
    train, val = split_documents(docs, 0.2)
    again = split_documents(docs, 0.2)
    assert [d.name for d in val] == [d.name for d in again[1]]
    assert 3 <= len(val) <= 20 and len(train) + len(val) == 50
    one = [blt.training.data.Document("big", b"0123456789" * 10)]
    train, val = split_documents(one, 0.1)  # few documents: hold out the tail, nanoGPT-style
    assert train[0].data == b"0123456789" * 9 and val[0].data == b"0123456789"


def test_stream_frames_documents_and_packs():
    stream = build_stream([blt.training.data.Document("a", b"hi"), blt.training.data.Document("b", b"yo")])
    assert stream.tolist() == [BOS_ID, 108, 109, EOS_ID, BOS_ID, 125, 115, EOS_ID]
    seqs = PackedSequences(stream, 3)
    assert len(seqs) == 2
    batch = seqs.batch([1])
    assert batch["ids"].tolist() == [[EOS_ID, BOS_ID, 125]] and batch["targets"].tolist() == [[BOS_ID, 125, 115]]
    with pytest.raises(blt.BltError, match="fewer than one sequence of 16"):
        PackedSequences(stream, 16)


def test_batch_order_is_a_function_of_position():
    first = batch_indices(10, seed=3, position=0, count=25)
    assert sorted(first[:10]) == list(range(10))  # each epoch visits every sequence once
    assert batch_indices(10, seed=3, position=7, count=5) == first[7:12]  # resuming mid-epoch


def test_stream_entropies_use_document_context_only():
    em = random_entropy_model()
    a, b = TEXT[:80].encode(), TEXT[80:200].encode()
    stream = build_stream([blt.training.data.Document("a", a), blt.training.data.Document("b", b)])
    got = stream_entropies(em, stream, chunk=32)  # chunks overlap by the model's reach: same values
    alone = em.entropies(torch.from_numpy(build_stream([blt.training.data.Document("b", b)]).astype(np.int64))[None])[
        0
    ].numpy()
    assert np.abs(got[len(a) + 2 :] - alone).max() < 1e-4


def test_entropy_cache_is_computed_once_and_keyed(tmp_path, monkeypatch):
    em = random_entropy_model()
    stream = build_stream([blt.training.data.Document("a", TEXT.encode())])
    first = cached_entropies(em, stream, tmp_path)
    assert isinstance(first, np.memmap)
    calls = []
    monkeypatch.setattr(blt.training.data, "stream_entropies", lambda *a, **k: calls.append(1))
    again = cached_entropies(em, stream, tmp_path)
    assert not calls and np.array_equal(first, again)
    other = random_entropy_model(seed=1)
    monkeypatch.undo()
    cached_entropies(other, stream, tmp_path)
    assert len(list(tmp_path.glob("entropies-*.npy"))) == 2


def test_the_document_split_does_not_depend_on_where_the_files_are(tmp_path, monkeypatch):
    """The same files, named by a relative path, an absolute one, or copied into another folder, give the same
    validation documents (the demo's split must not depend on --out)."""
    for folder in ("a/corpus", "b/elsewhere/corpus"):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(40):
            (tmp_path / folder / f"{i:02d}.txt").write_text(f"document {i} " * 20)
    monkeypatch.chdir(tmp_path)
    splits = [
        [os.path.basename(d.name) for d in split_documents(read_documents([path]))[1]]
        for path in ("a/corpus", tmp_path / "a/corpus", "./b/elsewhere/corpus")
    ]
    assert splits[0] and splits[0] == splits[1] == splits[2]
