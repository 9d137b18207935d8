"""The lm-evaluation-harness adapter on small local tasks in the harness's YAML format (no download): its
log-likelihoods are `blt score`'s, its generations `model.generate`'s."""

import json
import math

import pytest
import torch

import blt
from blt.cli import main
from blt.inference import score
from blt.inference.sampling import allowed_ids
from blt.tokenizer import BOS_ID, OFFSET, encode
from tests.helpers import TEXT, tiny_config

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (the `lm-eval` extra)")
TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager
BLTLM = pytest.importorskip("blt.lm_eval").BLTLM

DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "idea"], "answer": 0, "text": TEXT[:150]},
    {"question": "Zwei plus zwei ist", "choices": ["vier", "fünf", "blau"], "answer": 0, "text": "Grüße aus Köln!"},
    {"question": "Water is", "choices": ["wet", "dry", "loud"], "answer": 1, "text": "hello world"},
]
TASKS = {
    "blt_tiny_mc": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}, {metric: acc_norm}, {metric: acc_bytes}]
""",
    "blt_tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: bits_per_byte}]
""",
    "blt_tiny_gen": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs: {until: [".", "e"], max_gen_toks: 12, do_sample: false}
metric_list: [{metric: exact_match}]
""",
}
LN2 = math.log(2)


def write_tasks(folder):
    """The three tasks as YAML files reading a JSON-lines file through the `json` dataset builder."""
    folder.mkdir(exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ntest_split: test\n"
        head += f"dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {folder / 'cache'}}}\n"
        (folder / f"{name}.yaml").write_text(head + body)
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    torch.manual_seed(0)
    model = blt.BLT(tiny_config()).eval()
    tasks = write_tasks(tmp_path_factory.mktemp("tasks"))
    results = lm_eval.simple_evaluate(
        model=BLTLM(pretrained=model, batch_size=4),
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    return model, results


def test_loglikelihoods_are_blt_scores(evaluated):
    model, results = evaluated
    samples = results["samples"]["blt_tiny_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        for (context, continuation), [(ll, greedy)] in zip(sample["arguments"], sample["resps"]):
            assert continuation.startswith(" ")  # the harness's delimiter belongs to the continuation
            logp, _ = score(model, context + continuation)  # log2 p of every byte after BOS
            n = len(continuation.encode())
            assert ll == pytest.approx(float(logp[-n:].sum()) * LN2, rel=1e-6, abs=1e-6)
            logits = model(encode(context + continuation)[None])[0, :-1]
            picks = logits.masked_fill(~allowed_ids(True, False), float("-inf")).argmax(-1)  # bytes and EOS
            assert greedy == bool((picks[-n:] == encode(continuation, bos=False)).all())
        lls = [resp[0][0] for resp in sample["resps"]]
        acc = float(max(range(len(lls)), key=lls.__getitem__) == sample["doc"]["answer"])
        assert sample["acc"] == acc
        by_chars = [ll / len(c) for ll, c in zip(lls, sample["doc"]["choices"])]  # acc_norm: per character
        assert sample["acc_norm"] == float(max(range(len(lls)), key=by_chars.__getitem__) == sample["doc"]["answer"])


def test_is_greedy_holds_for_what_greedy_decoding_makes():
    torch.manual_seed(0)
    model = blt.BLT(tiny_config()).eval()
    with torch.no_grad():  # logit 0 for all but ASCII bytes: greedy text is ASCII (a str the harness can pass)
        model.local_decoder.output.weight[: OFFSET + 32].zero_()
        model.local_decoder.output.weight[OFFSET + 127 :].zero_()
    greedy = model.generate(["The cat"], 6)[0].decode()
    requests = [type("Request", (), {"args": ("The cat", c)})() for c in (greedy, greedy[:-1] + "#")]
    [(_, made), (_, changed)] = BLTLM(pretrained=model).loglikelihood(requests, disable_tqdm=True)
    assert made and not changed


def test_loglikelihood_rolling_is_the_whole_text_score(evaluated):
    model, results = evaluated
    for sample in results["samples"]["blt_tiny_rolling"]:
        (text,) = sample["arguments"][0]
        logp, _ = score(model, text)
        assert sample["resps"][0][0] == pytest.approx(float(logp.sum()) * LN2, rel=1e-6)


def test_generate_until_is_generate_with_the_stop_strings(evaluated):
    model, results = evaluated
    for sample in results["samples"]["blt_tiny_gen"]:
        context, kwargs = sample["arguments"][0]
        want = model.generate([context], kwargs["max_gen_toks"], stop=kwargs["until"])[0]
        assert sample["resps"][0][0] == want.decode("utf-8", errors="replace")
    assert "exact_match,none" in results["results"]["blt_tiny_gen"]


def test_rolling_windows_with_max_length():
    torch.manual_seed(0)
    model = blt.BLT(tiny_config()).eval()
    text = TEXT[:40].encode()
    request = type("Request", (), {"args": (text.decode(),)})()
    (windowed,) = BLTLM(pretrained=model, max_length=16).loglikelihood_rolling([request], disable_tqdm=True)
    # by hand: 16 ids in, every byte predicted once: BOS + bytes 0..14 predict bytes 0..15, bytes 15..30 predict
    # 16..31, and bytes 23..38 predict the last 8 (32..39)
    ids = encode(text, bos=False)
    want = 0.0
    windows = (([BOS_ID] + ids[:15].tolist(), 0, 16), (ids[15:31].tolist(), 16, 16), (ids[23:39].tolist(), 32, 8))
    for inputs, first, n in windows:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs]))[0].float(), -1)[-n:]
        want += float(logp.gather(1, ids[first : first + n, None]).sum())
    assert windowed == pytest.approx(want, rel=1e-6)
    (whole,) = BLTLM(pretrained=model, max_length=64).loglikelihood_rolling([request], disable_tqdm=True)
    assert whole == pytest.approx(float(score(model, text)[0].sum()) * LN2, rel=1e-6)  # fits: no windows


@pytest.mark.slow  # the harness's own command line indexes its thousands of built-in tasks first
def test_the_harness_command_line_with_model_blt(tmp_path, capsys):
    torch.manual_seed(0)
    blt.BLT(tiny_config()).eval().save_pretrained(tmp_path / "m")
    tasks = write_tasks(tmp_path / "tasks")
    argv = ["lm-eval", "run", "--model", "blt", "--model_args", f"pretrained={tmp_path / 'm'}", "--tasks"]
    assert main([*argv, "blt_tiny_mc", "--include_path", str(tasks), "--device", "cpu"]) == 0
    assert "blt_tiny_mc" in capsys.readouterr().out
