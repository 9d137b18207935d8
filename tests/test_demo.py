"""`blt demo` end to end on its embedded corpus, with a handful of steps (the full demo is `make demo`), and the
corpus itself: English prose read from the standard library's files, never by importing a module."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import blt
from blt.experiments.corpus import books_corpus, shakespeare_corpus, stdlib_corpus, stdlib_dir
from blt.experiments.demo import run_demo
from blt.training.data import Document, build_stream, stream_entropies
from blt.training.evaluate import evaluate_stream
from blt.training.recipes import xz_bpb
from blt.weights import load_blt
from tests.helpers import shared_path

ROOT = Path(__file__).resolve().parents[1]


def test_corpus_comes_from_the_standard_library():
    docs = stdlib_corpus(max_bytes=400_000)
    assert len(docs) >= 20 and 300_000 < sum(len(t) for _, t in docs) <= 400_000
    assert docs == stdlib_corpus(max_bytes=400_000)  # deterministic
    assert len({text for _, text in docs}) == len(docs)  # no document twice
    if (stdlib_dir() / "pydoc_data" / "topics.py").is_file():
        assert any('The "if" statement is used for conditional execution' in t for _, t in docs)


def test_plays_come_from_the_package():
    """tiny Shakespeare is read from the installed package (no ../shared, no download), whole and in order."""
    docs = shakespeare_corpus()
    text = "\n\n".join(t for _, t in docs)
    assert len(docs) >= 60 and all(len(t) < 20_000 for _, t in docs)
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert 1_100_000 < len(text) < 1_120_000 and "ROMEO:" in text
    assert docs == shakespeare_corpus()


def test_books_come_from_the_package_without_their_front_and_back_matter():
    """The four books are read from the installed package: whole (each book's first and last words are there),
    without Project Gutenberg's notices or dictd's index lines, the prose one paragraph per line, the poem as
    printed, the lexicon an entry a paragraph without its tables."""
    docs = books_corpus()
    by_book = {
        book: "\n\n".join(t for n, t in docs if n.rsplit("-", 1)[0] == book)
        for book in ("alice", "workshop", "paradise-lost", "jargon")
    }
    assert {n.rsplit("-", 1)[0] for n, _ in docs} == set(by_book) and sum(len(t) for _, t in docs) > 2_000_000
    alice, workshop, poem, lexicon = by_book.values()
    assert lexicon.startswith("(TM): [Usenet] ASCII rendition of the") and "\n\n/dev/null, n. [from the Unix" in lexicon
    assert lexicon.endswith(
        "zorkmid, n. The canonical unit of currency in hacker-written games. This originated in "
        "Zork but has spread to nethack and is referred to in several other games."
    )
    assert not any(c in lexicon for c in "{}\u2500\u2502\u201c\u201d")
    assert alice.startswith("ALICE'S ADVENTURES IN WONDERLAND") and alice.endswith("the happy summer days.")
    assert "Alice was beginning to get very tired of sitting by her sister on the bank," in alice
    assert workshop.startswith("The Workshop on Electronic Texts (1) drew together") and "(202) 707" not in workshop
    assert poem.startswith("Book I\n") and "Of Man's first disobedience, and the fruit\nOf that forbidden" in poem
    assert poem.endswith("Through Eden took their solitary way.")
    assert not any("gutenberg" in t.lower() or "`" in t for t in (alice, workshop, poem))
    assert not any("\r" in t for _, t in docs)
    assert all(len(t) < 20_000 for _, t in docs) and docs == books_corpus()


def test_corpus_imports_nothing_even_without_pydoc_data(tmp_path):
    """With pydoc_data hidden and a module planted next to the standard library, building the corpus runs no
    foreign code and imports no module that was not already imported."""
    fake = tmp_path / "lib"
    fake.mkdir()
    (fake / "aaa_evil.py").write_text('"""An evil module: importing it writes a file."""\nopen("PWNED", "w").close()\n')
    (fake / "notes.py").write_text(
        '"""' + "This module explains how a careful reader checks things twice. " * 3 + '"""\n'
    )
    script = (
        "import sys; before = set(sys.modules)\n"
        "from blt.experiments.corpus import stdlib_corpus\n"
        "after_import = set(sys.modules)\n"
        f"docs = stdlib_corpus(stdlib={str(fake)!r})\n"
        "new = set(sys.modules) - after_import\n"
        "print(len(docs), sorted(new))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    count, new = proc.stdout.split(" ", 1)
    assert int(count) == 1 and new.strip() == "[]"  # the docstring of notes.py; nothing imported
    assert not (tmp_path / "PWNED").exists()


def test_demo_writes_everything(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, entropy_steps=4, blt_steps=4, quiet=True, corpus_bytes=200_000)
    for name in (
        "entropy/model.safetensors",
        "blt/model.safetensors",
        "blt/entropy_model/model.safetensors",
        "patches.html",
        "patches.png",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    model = blt.load_pretrained(out / "blt")
    assert model.patcher.mode == "entropy" and model.entropy_model is not None
    assert result["unigram_bpb"] > 4.0 and result["bpb"] > 0 and result["mean_patch_bytes"] > 1
    assert len(result["sample"]) > 0 and len(result["greedy"]) > 0
    html = (out / "patches.html").read_text()
    assert html.count('class="p"') > 5 and "entropy" in html
    summary = json.loads((out / "blt" / "summary.json").read_text())
    assert summary["bpb"] == result["bpb"]


@pytest.mark.slow
def test_demo_generalizes_to_english_it_never_saw(tmp_path, monkeypatch):
    """The full demo (about 4 minutes), scored on English from other sources (the web text and the two English
    Genesis versions of ../shared, 16 KB of each in 2 KB pieces): on average 0.1 bpb below its own entropy model,
    and below xz -9. (Issue 11 also asks for 16 KB pieces, where xz profits from repetition across the piece: on
    the 64 KB excerpts of benchmarks/generalization.py the demo beats it on average and on 5 of 8 texts, but on
    the first 16 KB of each text xz is still ahead on average.) The demo runs in `runs/demo` under `tmp_path`,
    the model `make demo` trains."""
    files = sorted(shared_path("webtext").glob("*.txt")) + [
        shared_path(f"genesis/english-{v}.txt") for v in ("kjv", "web")
    ]
    monkeypatch.chdir(tmp_path)
    run_demo("runs/demo", quiet=True)
    model = load_blt(tmp_path / "runs" / "demo" / "blt")
    scores = []
    for path in files:
        data = path.read_bytes()[:16384]
        pieces = [data[i : i + 2048] for i in range(0, len(data), 2048)]
        stream = build_stream([Document(str(i), piece) for i, piece in enumerate(pieces)])
        blt_bpb = evaluate_stream(model, stream, 512, entropies=stream_entropies(model.entropy_model, stream))["bpb"]
        entropy_bpb = evaluate_stream(model.entropy_model, stream, 512)["bpb"]
        xz = sum(xz_bpb(piece) * len(piece) for piece in pieces) / len(data)
        scores.append((path.name, blt_bpb, entropy_bpb, xz))
    blt_mean, entropy_mean, xz_mean = (sum(row[k] for row in scores) / len(scores) for k in (1, 2, 3))
    assert blt_mean < entropy_mean - 0.1 and blt_mean < xz_mean, scores
