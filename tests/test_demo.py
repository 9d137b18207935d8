"""`blt demo` end to end on its embedded corpus, with a handful of steps (the full demo is `make demo`)."""

import json

import blt
from blt.experiments.demo import run_demo, stdlib_corpus


def test_corpus_comes_from_the_standard_library():
    docs = stdlib_corpus()
    assert len(docs) >= 20 and sum(len(t) for _, t in docs) > 100_000


def test_demo_writes_everything(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, entropy_steps=4, blt_steps=4, quiet=True)
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
    html = (out / "patches.html").read_text()
    assert html.count('class="p"') > 5 and "entropy" in html
    summary = json.loads((out / "blt" / "summary.json").read_text())
    assert summary["bpb"] == result["bpb"]
