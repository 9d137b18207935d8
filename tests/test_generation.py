"""Cached generation is exact: byte-identical to recomputing the whole model for every byte, logits
within 1e-4 at every step, for every patcher, in batches, and against transformers' uncached generate."""

import pytest
import torch

import blt
from blt.config import PatchingConfig
from blt.inference import IncrementalBLT, generate_recompute
from tests.helpers import LONG, PATCHERS, SHORT, TEXT, generation_model, tiny_config


@pytest.mark.parametrize("name", list(PATCHERS))
def test_cached_equals_recompute(name):
    model = generation_model(name)
    cached, cached_logits = blt.inference.generate(model, [SHORT, LONG], 512, return_logits=True, stop_at_eos=False)
    for prompt, out, steps in zip([SHORT, LONG], cached, cached_logits):
        ref, ref_logits = generate_recompute(model, [prompt], 512, return_logits=True, stop_at_eos=False)
        assert out == ref[0]
        assert len(out) == 512 or name == "bpe"
        assert steps.shape == ref_logits[0].shape
        assert (steps - ref_logits[0]).abs().max() < 1e-4
    # the model really patched its own output along the way
    ids = model.encode(LONG + cached[1].decode("utf-8", errors="replace"))[None]
    assert 2 < int(model.patch_starts(ids).sum()) < ids.shape[1] or name == "byte"


def test_batch_rows_get_what_they_get_alone():
    model = generation_model("entropy-global")
    prompts = [LONG, "", SHORT, b"\xff\xfe bytes"]
    together = model.generate(prompts, 96, temperature=0.8, top_k=50, seed=7)
    alone = [model.generate([p], 96, temperature=0.8, top_k=50, seed=7)[0] for p in prompts]
    assert together == alone


def test_sampling_is_reproducible_with_a_seed():
    model = generation_model("space")
    a = model.generate([LONG], 128, temperature=1.0, top_p=0.9, seed=3)
    assert a == model.generate([LONG], 128, temperature=1.0, top_p=0.9, seed=3)
    assert a != model.generate([LONG], 128, temperature=1.0, top_p=0.9, seed=4)
    assert a == generate_recompute(model, [LONG], 128, temperature=1.0, top_p=0.9, seed=3)


class Boost(torch.nn.Module):
    """The output layer, with some ids made overwhelmingly likely."""

    def __init__(self, output, ids):
        super().__init__()
        self.output, self.ids = output, ids

    def forward(self, h):
        logits = self.output(h)
        logits[..., self.ids] += 100.0
        return logits


def test_special_ids_are_never_produced():
    model = generation_model("static")
    plain = model.local_decoder.output
    model.local_decoder.output = Boost(plain, [0, 1, 3])  # BOE, BOS, the BPE delimiter
    out = model.generate([SHORT], 64, stop_at_eos=False)[0]
    assert len(out) == 64  # bytes only, as if the special ids did not exist
    model.local_decoder.output = plain
    assert out == model.generate([SHORT], 64, stop_at_eos=False)[0]
    model.local_decoder.output = Boost(plain, [2])  # EOS
    assert model.generate([SHORT], 64)[0] == b""  # it ends generation at once
    assert model.generate([SHORT], 64, stop_at_eos=False)[0] == out  # or is never produced


def test_stop_strings_end_a_row_and_are_left_out():
    model = generation_model("space")
    full = model.generate([LONG], 80)[0]
    stop = full[30:33]
    cut = model.generate([LONG], 80, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_bad_generation_input():
    model = generation_model("static")
    with pytest.raises(blt.BltError, match="max_new_bytes must be a positive integer"):
        model.generate([SHORT], 0)
    with pytest.raises(blt.BltError, match="list of str or bytes"):
        model.generate(SHORT, 4)
    assert len(model.generate([""], 8)[0]) <= 8  # an empty prompt starts from BOS
    small = blt.BLT(
        tiny_config(max_seqlen=8, patching=PatchingConfig(mode="static", patch_size=4)), patcher=blt.StaticPatcher(4)
    )
    with pytest.raises(blt.BltError, match="context is 8 patches"):
        small.generate([TEXT[:60]], 4)
    with pytest.raises(blt.BltError, match="reached the global transformer's context of 8 patches"):
        small.generate(["Hi"], 64, stop_at_eos=False)


def test_no_entropy_model_no_generation():
    model = blt.BLT(tiny_config(patching=PatchingConfig(mode="entropy")))
    with pytest.raises(blt.BltError, match="needs the model's patcher"):
        IncrementalBLT(model)


def test_matches_transformers_uncached_generate(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers import build_pair, set_threshold

    hf, ours = build_pair(tmp_path, window=16, patcher_window=16)
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)
        ours.local_decoder.output.weight.mul_(4.0)
    prompt = blt.encode(LONG)[None]
    set_threshold(hf, ours, prompt)
    out = hf.generate(
        prompt, max_new_tokens=512, do_sample=False, use_cache=False, suppress_tokens=[0, 1, 2, 3], pad_token_id=0
    )
    theirs = blt.tokenizer.ids_to_bytes(out[0, prompt.shape[1] :])
    assert ours.generate([LONG], 512, stop_at_eos=False)[0] == theirs


def test_score_long_text_through_the_cache_equals_one_pass():
    from blt.inference import score

    model = generation_model("entropy-global")
    text = (TEXT * 3).encode()
    one, is_byte = score(model, text)
    cached, _ = score(model, text, max_forward=100)
    assert (one - cached).abs().max() < 1e-4
    assert int(is_byte.sum()) == len(text)
    logits = model(model.encode(text)[None])[0, :-1]
    ref = torch.log_softmax(logits, -1).gather(1, model.encode(text)[1:, None])[:, 0] / torch.log(torch.tensor(2.0))
    assert (one - ref).abs().max() < 1e-5


@pytest.fixture
def saved_model(tmp_path):
    model = generation_model("entropy-global")
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_generate_command_streams_what_the_api_returns(saved_model, capsysbinary):
    from blt.cli import main

    model, path = saved_model
    assert main(["generate", "--model", str(path), "--max-new-bytes", "40", "--raw", LONG]) == 0
    assert capsysbinary.readouterr().out == model.generate([LONG], 40)[0]
    assert (
        main(["generate", "--model", str(path), "--max-new-bytes", "40", "--temperature", "0.9", "--seed", "1", LONG])
        == 0
    )
    text = capsysbinary.readouterr().out.decode()
    expected = (LONG.encode() + model.generate([LONG], 40, temperature=0.9, seed=1)[0]).decode(
        "utf-8", errors="replace"
    )
    assert text == expected + "\n"


def test_score_command(saved_model, tmp_path, capsys):
    import json

    from blt.cli import main
    from blt.inference import score

    model, path = saved_model
    (tmp_path / "t.txt").write_bytes(TEXT.encode())
    assert main(["score", "--model", str(path), str(tmp_path / "t.txt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    logp, _ = score(model, TEXT.encode())
    assert got["n_bytes"] == len(TEXT.encode()) and got["bpb"] == pytest.approx(float(-logp.sum()) / len(TEXT.encode()))
    assert main(["score", "--model", str(path), str(tmp_path / "t.txt"), "--per-byte"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(TEXT.encode()) + 1 and lines[0].split("\t")[:3] == ["0", "49", "I"]
    assert main(["score", "--model", str(path), str(tmp_path / "none.txt")]) == 2


def test_ctrl_c_while_streaming_exits_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    # a global context no stream reaches before the signal lands, however late (decoding allocates by use)
    path = tmp_path / "m"
    generation_model("static", max_seqlen=10**7).save_pretrained(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blt.cli",
            "generate",
            "--model",
            str(path),
            "--max-new-bytes",
            "100000",
            "--no-stop-at-eos",
            "--raw",
            "hello",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # Ctrl-C as a terminal's child gets it: SIGINT at its default, whatever this process set it to
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.set_blocking(proc.stdout.fileno(), False)
    received, deadline = b"", time.time() + 60
    while len(received) < 20 and time.time() < deadline:
        received += proc.stdout.read() or b""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stdout.fileno(), True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode(errors="replace")
    assert len(received + out) >= 20 and b"Traceback" not in err and b"interrupted" in err
