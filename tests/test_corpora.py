"""--data takes Parquet files and `datasets` save_to_disk folders, through the same document list."""

import json

import pytest
import torch

import blt
from blt.cli import EXIT_USER_ERROR, main
from blt.errors import BltError
from blt.training.data import read_documents, split_documents
from tests.helpers import TEXT, tiny_config

pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (the `data` extra)")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = ["the first document", "", "zweites Dokument: äöü", "third\nwith a newline"]


def test_parquet_text_column(tmp_path):
    pq.write_table(pa.table({"text": TEXTS, "id": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    docs = read_documents([tmp_path / "a.parquet"])
    assert [d.data for d in docs] == [t.encode() for t in TEXTS if t]  # the empty row is skipped
    assert docs[0].name == f"{tmp_path / 'a.parquet'}:0"


def test_parquet_other_field_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "d" / "x.parquet")
    (tmp_path / "d" / "y.txt").write_text("plain")
    docs = read_documents([tmp_path / "d"], text_field="body")
    assert [d.data for d in docs] == [b"one", b"two", b"plain"]


def test_parquet_without_the_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"body": ["one"]}), tmp_path / "a.parquet")
    with pytest.raises(BltError, match=r"no 'text' column \(columns: body"):
        read_documents([tmp_path / "a.parquet"])


def test_max_bytes_cuts_the_corpus(tmp_path):
    pq.write_table(pa.table({"text": ["abcdef", "ghijkl", "mnop"]}), tmp_path / "a.parquet")
    docs = read_documents([tmp_path / "a.parquet"], max_bytes=8)
    assert [d.data for d in docs] == [b"abcdef", b"gh"]


def test_save_to_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets not installed (the `data` extra)")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    docs = read_documents([tmp_path / "ds"])
    assert [d.data for d in docs] == [t.encode() for t in TEXTS if t]
    train, val = split_documents(docs, 0.25, "tail")  # the same framing/split path as text files
    assert sum(len(d.data) for d in train + val) == sum(len(d.data) for d in docs)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]})}).save_to_disk(str(tmp_path / "dd"))
    assert [d.data for d in read_documents([tmp_path / "dd"])] == [b"a b"]


def test_the_cli_reads_parquet(tmp_path, capsys):
    torch.manual_seed(0)
    blt.BLT(tiny_config()).eval().save_pretrained(tmp_path / "m")
    pq.write_table(pa.table({"text": ["hello parquet world " * 4]}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("hello parquet world " * 4)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "a.parquet")]) in (0, None)
    from_parquet = capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "a.txt")]) in (0, None)
    assert from_parquet.splitlines()[-1] == capsys.readouterr().out.splitlines()[-1]  # same bytes, same score


def test_train_reads_a_parquet_column_up_to_max_bytes(tmp_path, capsys):
    docs = [f"{i}: {TEXT}" for i in range(4)]
    pq.write_table(pa.table({"body": docs, "n": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    cap = len(docs[0].encode()) + len(docs[1].encode()) + 50
    (tmp_path / "txt").mkdir()  # the same documents as text files, the third one cut where --max-bytes cuts it
    for i, doc in enumerate([docs[0], docs[1], docs[2].encode()[:50].decode()]):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc)
    common = ["train", "--preset", "tiny", "--patching", "space", "--max-steps", "2", "--seq-len", "64"]
    common += ["--split", "tail"]  # document names differ (file:row, path): keep the split independent of them
    parquet = ["--data", str(tmp_path / "a.parquet"), "--text-field", "body", "--max-bytes", str(cap)]
    assert main([*common, *parquet, "--out", str(tmp_path / "p")]) == 0
    assert main([*common, "--data", str(tmp_path / "txt"), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "p" / "model.safetensors").read_bytes() == (tmp_path / "t" / "model.safetensors").read_bytes()
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert (run["text_field"], run["max_bytes"]) == ("body", cap)
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "p"), *parquet]) == 0
    from_parquet = capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "p"), "--data", str(tmp_path / "txt")]) == 0
    assert from_parquet.splitlines()[0] == capsys.readouterr().out.splitlines()[0]  # the same bits per byte


def test_a_parquet_file_without_the_column_is_one_line_naming_it(tmp_path, capsys):
    pq.write_table(pa.table({"body": ["one"], "n": [1]}), tmp_path / "a.parquet")
    args = ["train-entropy", "--preset", "tiny", "--data", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "r")]
    assert main([*args, "--text-field", "content"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no 'content' column (columns: body, n" in err
