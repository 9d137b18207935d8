"""Careless and hostile input, one table: every case is refused with exit status 2 (CLI) or a BltError (API),
a message of one line naming the bad value, no traceback, and no file changed outside the run's own folder.

CLI cases run `blt.cli.main` in-process (a few hundred cases in seconds); SUBPROCESS_CASES also run as real
`python -m blt.cli` processes, which is where a traceback or a wrong exit status would show as a user sees it.
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blt
from blt.cli import main
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.errors import BltError
from blt.experiments.demo import run_demo
from blt.inference.sampling import StopChecker, check_generation_args
from blt.training import data as data_module
from blt.training.data import read_documents
from blt.training.loop import TrainConfig
from blt.training.recipes import train_entropy
from blt.weights import load_blt
from tests.helpers import TEXT, tiny_config, tiny_entropy_config

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


# ---- the shared ground every case runs against ------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    blt.BLT(tiny_config(max_encoder_seq_length=256)).eval().save_pretrained(base / "model")
    blt.EntropyModel(tiny_entropy_config()).eval().save_pretrained(base / "entropy")
    (base / "text.txt").write_text(TEXT * 20)
    (base / "empty.txt").write_bytes(b"")
    (base / "control.txt").write_bytes(b"\x1b[31mred\x00 \xc2\x9b end")
    (base / "emptydir").mkdir()
    (base / "bad-utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (base / "bad-line.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (base / "no-text.jsonl").write_text('{"body": "x"}\n')
    (base / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (base / "bomb.gz").write_bytes(gzip.compress(b"\0" * (4 << 20)))
    (base / "afile").write_text("a file, not a folder\n")
    (base / "foreign").mkdir()
    (base / "foreign" / "thesis.tex").write_text("years of work\n")
    configs = {
        "list": [1, 2],
        "dim-neg": {"dim_global": -64},
        "dim-zero": {"dim_global": 0},
        "dim-str": {"dim_global": "64"},
        "dim-null": {"dim_global": None},
        "heads-zero": {"n_heads_global": 0},
        "window-zero": {"local_attention_window_len": 0},
        "patching-null": {"patching": None},
        "unknown-field": {"dim_globl": 64},
        "eps-neg": {"norm_eps": -1e-5},
        "ngram-zero": {"encoder_hash_byte_group_size": [0, 3]},
        "bool-int": {"n_layers_global": True},
        "mode": {"patching": {"mode": "magic"}},
    }
    for name, cfg in configs.items():
        (base / f"config-{name}.json").write_text(json.dumps(cfg))
    (base / "config-notjson.json").write_text("{dim: 64")
    return base


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


T = "train-entropy --data {base}/text.txt --out {work}/run --preset tiny".split()
B = "train --data {base}/text.txt --out {work}/run --preset tiny --patching static".split()
G = "generate --model {base}/model".split()

# (id, argv, a fragment the one-line message must contain, folder the command may create or change)
CLI_CASES = []


def case(name, argv, expect, own=None):
    CLI_CASES.append(pytest.param(argv, expect, own, id=name))


for flag in ("--max-steps", "--batch-size", "--grad-accum", "--seq-len", "--warmup-steps", "--eval-every",
             "--ckpt-every", "--log-every"):  # fmt: skip
    for value in ("0", "-1", "x", "1.5"):
        case(f"train-entropy{flag}={value}", T + [flag, value], repr(value))
for value in ("nan", "inf", "-1", "0", "x"):
    case(f"train-entropy--lr={value}", T + ["--lr", value], repr(value))
for value in ("nan", "-1", "0"):
    case(f"train-entropy--max-minutes={value}", T + ["--max-minutes", value], repr(value))
for value in ("-1", str(2**70), "x"):
    case(f"train--seed={value}", B + ["--seed", value], repr(value))
for value in ("1", "-0.1", "nan", "2"):
    case(f"train--val-fraction={value}", B + ["--val-fraction", value], repr(value))
for value in ("tpu", "cuda:x", "gpu0") + (() if CUDA else ("cuda",)):
    case(f"train--device={value}", B + ["--device", value], repr(value))
for value in ("0", "nan", "-3"):
    case(f"train--target-patch-bytes={value}", B + ["--target-patch-bytes", value], repr(value))
for value in ("fp16", "BF16", ""):
    case(f"train--precision={value}", B + ["--precision", value], repr(value))
case("demo--precision=fp16", "demo --out {work}/demo --precision fp16".split(), "'fp16'")
for value in ("nan", "inf"):
    case(f"train--threshold={value}", B + ["--threshold", value], repr(value))
for value in ("0", "-5"):
    case(f"train--bpe-vocab={value}", B + ["--bpe-vocab", value], repr(value))
case("train--patching=magic", B + ["--patching", "magic"], "'magic'")
case("train--preset=huge", B + ["--preset", "huge"], "'huge'")
case("train--out=a-file", "train --data {base}/text.txt --out {base}/afile --patching static".split(), "afile")
case("train-entropy--out=a-file", "train-entropy --data {base}/text.txt --out {base}/afile".split(), "afile")
case("train--out=foreign", "train --data {base}/text.txt --out {base}/foreign --patching static".split(), "foreign")
case("train-entropy--out=foreign", "train-entropy --data {base}/text.txt --out {base}/foreign".split(), "foreign")
case("train--resume-nothing", B + ["--resume"], "no checkpoint", own="run")
case("train--cache-dir=a-file",
     "train --data {base}/text.txt --out {work}/run --preset tiny --entropy-model {base}/entropy --cache-dir "
     "{base}/afile --max-steps 1".split(), "afile", own="run")  # fmt: skip
case("train--entropy-model-missing",
     "train --data {base}/text.txt --out {work}/run --preset tiny --entropy-model {work}/nope".split(), "nope",
     own="run")  # fmt: skip
case("train--no-entropy-model", "train --data {base}/text.txt --out {work}/run --preset tiny".split(),
     "--entropy-model", own="run")  # fmt: skip
for name, path, expect in (
    ("missing", "{work}/nope.txt", "nope.txt"),
    ("empty", "{base}/empty.txt", "empty"),
    ("emptydir", "{base}/emptydir", "emptydir"),
    ("bad-utf8-jsonl", "{base}/bad-utf8.jsonl", "UTF-8"),
    ("bad-line-jsonl", "{base}/bad-line.jsonl", "bad-line.jsonl:2"),
    ("no-text-jsonl", "{base}/no-text.jsonl", "'text'"),
    ("bad-gzip", "{base}/bad.gz", "bad.gz"),
    ("gzip-bomb", "{base}/bomb.gz", "gzip bomb"),
    ("proc-self-mem", "/proc/self/mem", "/proc/self/mem"),
    ("no-glob-match", "{work}/*.nothing", "*.nothing"),
    ("a-directory-glob", "{work}/[", "["),
):
    case(f"data-{name}", ["train-entropy", "--data", path, "--out", "{work}/run", "--preset", "tiny"], expect, "run")
for flag, value in (("--batch-size", "-1"), ("--batch-size", "0"), ("--seq-len", "0"), ("--seq-len", "-5"),
                    ("--split", "test"), ("--device", "tpu"), ("--context", "-1"), ("--context", "x")):  # fmt: skip
    case(f"eval{flag}={value}", ["eval", "--model", "{base}/model", "--data", "{base}/text.txt", flag, value],
         repr(value))  # fmt: skip
case("eval--split-val-without-run", "eval --model {base}/model --data {base}/text.txt --split val".split(), "run.json")
case("eval--seq-len-beyond-model", "eval --model {base}/model --data {base}/text.txt --seq-len 100000".split(),
     "100000")  # fmt: skip
case("eval--context-as-long-as-the-window",
     "eval --model {base}/model --data {base}/text.txt --seq-len 64 --context 64".split(), "64")  # fmt: skip
case("eval--model-missing", "eval --model {work}/none --data {base}/text.txt".split(), "none")
case("eval--model-is-file", "eval --model {base}/afile --data {base}/text.txt".split(), "afile")
for name in ("list", "dim-neg", "dim-zero", "dim-str", "dim-null", "heads-zero", "window-zero", "patching-null",
             "unknown-field", "eps-neg", "ngram-zero", "bool-int", "mode", "notjson"):  # fmt: skip
    frag = {"list": "list", "dim-neg": "-64", "dim-zero": "dim_global", "dim-str": "'64'", "dim-null": "null",
            "heads-zero": "n_heads_global", "window-zero": "local_attention_window_len", "patching-null": "None",
            "unknown-field": "dim_globl", "eps-neg": "norm_eps", "ngram-zero": "[0, 3]", "bool-int": "True",
            "mode": "'magic'", "notjson": "not valid JSON"}[name]  # fmt: skip
    case(f"flops--config={name}", ["flops", "--config", f"{{base}}/config-{name}.json"], frag)
case("flops--seq-bytes=0", "flops --model {base}/model --seq-bytes 0".split(), "'0'")
case("flops--mean-patch-bytes=nan", "flops --model {base}/model --mean-patch-bytes nan".split(), "'nan'")
case("flops--config-missing", "flops --config {work}/none.json".split(), "none.json")
C = "compare --data {base}/text.txt --out {work}/cmp".split()
for value in ("nan", "-1", "x", ",", "inf", "0"):
    case(f"compare--budgets={value}", C + ["--budgets", value], repr(value))
case("compare--models=magic", C + ["--budgets", "1e9", "--models", "magic"], "magic")
case("compare--seq-len=0", C + ["--budgets", "1e9", "--seq-len", "0"], "'0'")
case("compare--val-fraction=1", C + ["--budgets", "1e9", "--val-fraction", "1"], "'1'")
case("compare--out=foreign", "compare --data {base}/text.txt --out {base}/foreign --budgets 1e9".split(), "foreign")
case("compare--out=a-file", "compare --data {base}/text.txt --out {base}/afile --budgets 1e9".split(), "afile")
for value in ("-5", "0", "x"):
    case(f"score--max-forward={value}", ["score", "--model", "{base}/model", "{base}/text.txt", "--max-forward", value],
         repr(value))  # fmt: skip
case("score--max-forward-beyond-model",
     "score --model {base}/model {base}/text.txt --max-forward 100000".split(), "100000")  # fmt: skip
case("score-missing-file", "score --model {base}/model {work}/none.txt".split(), "none.txt")
for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                    ("--temperature", "1e-45"), ("--top-k", "0"), ("--top-k", "2.5"), ("--top-p", "0"),
                    ("--top-p", "1.5"), ("--top-p", "nan"), ("--seed", str(2**70)), ("--seed", "-1"),
                    ("--max-new-bytes", "0"), ("--max-new-bytes", "-3"), ("--stop", ""), ("--stop", "\\x4"),
                    ("--device", "tpu")):  # fmt: skip
    case(f"generate{flag}={value}", G + ["hi", flag, value], "--stop" if flag == "--stop" else repr(value))
case("generate-long-prompt", G + ["x" * 1_000_000], "1000000 bytes")
for value in ("-1", "x", "1.5"):
    case(f"generate--speculate={value}", G + ["hi", "--speculate", value], repr(value))
case("generate--draft=magic", G + ["hi", "--speculate", "2", "--draft", "magic"], "'magic'")
case("generate--draft=entropy-without-one", G + ["hi", "--speculate", "2", "--draft", "entropy"], "entropy model")
case("patch--png=x.qqq", "patch --model {base}/model hello --png {work}/x.qqq".split(), "x.qqq")
case("patch-empty", ["patch", "--model", "{base}/model", ""], "empty")
case("patch-nothing", "patch --model {base}/model".split(), "--file")
case("patch--file-missing", "patch --model {base}/model --file {work}/none".split(), "none")
case("demo--out=foreign", "demo --out {base}/foreign".split(), "foreign")
case("demo--out=a-file", "demo --out {base}/afile".split(), "afile")
case("demo--entropy-steps=0", "demo --out {work}/demo --entropy-steps 0".split(), "'0'")
case("convert-into-foreign", "convert {base}/model {base}/foreign".split(), "foreign")
case("convert-missing-source", "convert {work}/none {work}/dst".split(), "none")
case("convert--to=onnx", "convert {base}/model {work}/dst --to onnx".split(), "'onnx'")


def fill(argv, base, work):
    return [a.format(base=base, work=work) for a in argv]


def check_one_line(err: str, expect: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    assert expect in lines[0], (expect, lines[0])


@pytest.mark.parametrize("argv, expect, own", CLI_CASES)
def test_cli_case(argv, expect, own, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_FILE_BYTES", 1 << 20)  # the 4 MiB bomb inflates past this
    work = tmp_path / "work"
    work.mkdir()
    before_base, before_work = snapshot(base), snapshot(work)
    with pytest.raises(SystemExit) if _parse_error(argv, base, work) else _nothing() as exit:
        code = main(fill(argv, base, work))
    if exit is not None:
        code = exit.value.code
    assert code == 2
    check_one_line(capsys.readouterr().err, expect.format(base=base, work=work))
    assert snapshot(base) == before_base  # the shared files, the foreign folder, the file: untouched
    after = snapshot(work)
    changed = {k for k in set(after) | set(before_work) if after.get(k) != before_work.get(k)}
    assert all(own and (k == own or k.startswith(own + "/")) for k in changed), changed


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _parse_error(argv, base, work) -> bool:
    from blt.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(fill(argv, base, work))
    except SystemExit:
        return True
    return False


def test_table_size():
    assert len(CLI_CASES) + len(API_CASES) >= 120


# ---- real processes ---------------------------------------------------------------------------------
SUBPROCESS_CASES = [
    (G + ["-"], "stdin is closed", None),
    (G + ["-"], "bytes", b"x" * 1_000_000),  # a 1 MB prompt on stdin: refused before any forward pass
    (T + ["--lr", "nan"], "'nan'", b""),
    ("flops --config {base}/config-list.json".split(), "list", b""),
    ("demo --out {base}/foreign".split(), "foreign", b""),
    (["patch", "--model", "{base}/model", "--file", "{base}/control.txt", "--no-color"], None, b""),
]


@pytest.mark.parametrize("argv, expect, stdin", SUBPROCESS_CASES, ids=lambda x: str(x)[:30])
def test_cli_in_a_process(argv, expect, stdin, base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(base)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kwargs = {"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}
    if stdin is None:  # stdin closed altogether, not merely empty
        kwargs = {"stdin": subprocess.DEVNULL, "preexec_fn": lambda: os.close(0)}
    out = subprocess.run(
        [sys.executable, "-m", "blt.cli", *fill(argv, base, work)], capture_output=True, env=env, timeout=120, **kwargs
    )
    err = out.stderr.decode(errors="replace")
    if expect is None:  # the terminal patch view: control bytes of the input shown as visible escapes
        assert out.returncode == 0, err
        assert b"\x1b[31m" not in out.stdout and b"\x00" not in out.stdout and b"\\x1b" in out.stdout
    else:
        assert out.returncode == 2, err
        check_one_line(err, expect)
    assert snapshot(base) == before


# ---- the Python API ---------------------------------------------------------------------------------
def _gen():
    yield "a"


API_CASES = []


def api(name, fn, expect):
    API_CASES.append(pytest.param(fn, expect, id=name))


for field, value in (("dim_global", -64), ("dim_global", 0), ("dim_global", "64"), ("dim_global", None),
                     ("n_heads_global", 0), ("local_attention_window_len", 0), ("cross_attn_k", 0),
                     ("norm_eps", float("nan")), ("rope_theta", float("inf")), ("ffn_dim_multiplier", -1.0),
                     ("n_layers_global", True), ("max_seqlen", 2**50), ("encoder_hash_byte_group_size", [0]),
                     ("vocab_size", 2.5), ("local_document_mask", "yes")):  # fmt: skip
    api(f"BLTConfig.{field}={value!r}", lambda f=field, v=value: tiny_config(**{f: v}), field)
api("BLTConfig.patching=None", lambda: tiny_config(patching=None), "patching")
api("BLTConfig-divisibility", lambda: tiny_config(n_heads_global=5), "divisible")
api("BLTConfig.from_dict-list", lambda: BLTConfig.from_dict([1]), "list")
api("EntropyModelConfig.dim=0", lambda: EntropyModelConfig(dim=0), "dim")
api("EntropyModelConfig.sliding_window=-1", lambda: EntropyModelConfig(sliding_window=-1), "sliding_window")
api("PatchingConfig.mode", lambda: PatchingConfig(mode="magic"), "magic")
api("PatchingConfig.threshold=nan", lambda: PatchingConfig(threshold=float("nan")), "threshold")
api("PatchingConfig.patch_size=0", lambda: PatchingConfig(patch_size=0), "patch_size")
for name, args in (
    ("prompts=[]", ([], 5, 0.0, None, None)),
    ("prompts=None", (None, 5, 0.0, None, None)),
    ("prompts=generator", (_gen(), 5, 0.0, None, None)),
    ("prompts=str", ("abc", 5, 0.0, None, None)),
    ("prompts=[1]", ([1], 5, 0.0, None, None)),
    ("top_k=2.5", (["a"], 5, 0.0, 2.5, None)),
    ("top_k=0", (["a"], 5, 0.0, 0, None)),
    ("temperature=nan", (["a"], 5, float("nan"), None, None)),
    ("temperature=inf", (["a"], 5, float("inf"), None, None)),
    ("temperature=1e-45", (["a"], 5, 1e-45, None, None)),
    ("temperature=-1", (["a"], 5, -1.0, None, None)),
    ("temperature=str", (["a"], 5, "hot", None, None)),
    ("top_p=0", (["a"], 5, 1.0, None, 0.0)),
    ("top_p=2", (["a"], 5, 1.0, None, 2.0)),
    ("top_p=nan", (["a"], 5, 1.0, None, float("nan"))),
    ("max_new_bytes=0", (["a"], 0, 0.0, None, None)),
    ("max_new_bytes=1.5", (["a"], 1.5, 0.0, None, None)),
    ("max_new_bytes=True", (["a"], True, 0.0, None, None)),
):
    api(f"generate-args.{name}", lambda a=args: check_generation_args(*a), name.split("=")[0])
api("stop=5", lambda: StopChecker(5), "stop")
for name, args in (("speculate=-1", (-1, "self")), ("speculate=2.0", (2.0, "self")),
                   ("speculate=True", (True, "self")), ("speculate=str", ("4", "self")), ("draft=magic", (2, "magic")),
                   ("draft=None", (2, None))):  # fmt: skip
    api(f"speculation.{name}", lambda a=args: _static_model().generate(["hi"], 4, speculate=a[0], draft=a[1]),
        name.split("=")[0])  # fmt: skip
api("speculation.entropy-draft-without-entropy-model",
    lambda: _static_model().generate(["hi"], 4, speculate=2, draft="entropy"), "entropy model")  # fmt: skip
api("stop=[1]", lambda: StopChecker([1]), "1")


def _static_model() -> blt.BLT:
    torch.manual_seed(0)
    return blt.BLT(tiny_config()).eval()


def _write_model_with(path: Path, change) -> Path:
    torch.manual_seed(0)
    blt.BLT(tiny_config()).save_pretrained(path)
    change(path)
    return path


def _retype(dtype):
    def change(path):
        tensors = load_file(str(path / "model.safetensors"))
        name = sorted(tensors)[0]
        t = tensors[name]
        tensors[name] = t.to(dtype) if dtype != torch.complex64 else torch.complex(t, t)
        save_file(tensors, str(path / "model.safetensors"))

    return change


for dtype in (torch.bool, torch.int32, torch.complex64, torch.float8_e4m3fn):
    api(f"weights-dtype-{dtype}", lambda tmp, d=dtype: load_blt(_write_model_with(tmp / "m", _retype(d))),
        str(dtype).removeprefix("torch."))  # fmt: skip
api("weights-truncated",
    lambda tmp: load_blt(_write_model_with(tmp / "m", lambda p: _truncate(p / "model.safetensors"))),
    "truncated")  # fmt: skip
api("weights-bpe-tokenizer-corrupt",
    lambda tmp: load_blt(_write_model_with(tmp / "m", lambda p: (p / "bpe_tokenizer.json").write_text("{oops"))),
    "bpe_tokenizer.json")  # fmt: skip
api("weights-huge-config-small-file",
    lambda tmp: load_blt(_write_model_with(tmp / "m", lambda p: _edit_config(p, dim_global=8192, n_layers_global=64))),
    "does not match")  # fmt: skip
api("weights-config-list", lambda tmp: load_blt(_write_model_with(tmp / "m", lambda p: (p / "config.json").write_text(
    '["blt_lm"]'))), "config.json")  # fmt: skip
api("weights-hf-config-missing-keys", lambda tmp: load_blt(_hf_missing(tmp)), "config.json")
api("weights-int-keys-consolidated", lambda tmp: load_blt(_consolidated_int_keys(tmp)), "0")
for field, value in (("max_steps", 0), ("grad_accum", 0), ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0),
                     ("batch_size", -1), ("log_every", 0), ("seed", -1), ("max_minutes", float("nan")),
                     ("precision", "fp16")):  # fmt: skip
    api(f"TrainConfig.{field}={value!r}", lambda f=field, v=value: TrainConfig(**{f: v}), field)
api("train_entropy-max_steps=0", lambda tmp: train_entropy([str(tmp / "x")], tmp / "run", max_steps=0), "max_steps")
api("run_demo-precision=fp16", lambda tmp: run_demo(tmp / "demo", precision="fp16"), "precision")
api("data-empty-list", lambda tmp: read_documents([]), "no data")
api("data-proc-mem", lambda tmp: read_documents(["/proc/self/mem"]), "/proc/self/mem")


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _hf_missing(tmp: Path) -> Path:
    torch.manual_seed(0)
    model = blt.BLT(tiny_config(cross_attn_nheads=None))
    model.save_pretrained(tmp / "ours")
    blt.convert(tmp / "ours", tmp / "hf", to="hf")
    cfg = json.loads((tmp / "hf" / "config.json").read_text())
    cfg["encoder_config"] = {"hidden_size": 32}  # heads, layers ... missing
    cfg.pop("global_config", None)
    (tmp / "hf" / "config.json").write_text(json.dumps(cfg))
    return tmp / "hf"


def _consolidated_int_keys(tmp: Path) -> Path:
    path = tmp / "rel"
    path.mkdir()
    (path / "params.json").write_text(json.dumps({"model": {"dim_global": 64}}))
    torch.save({"model": {0: torch.zeros(2)}}, path / "consolidated.pth")
    return path


@pytest.mark.parametrize("fn, expect", API_CASES)
def test_api_case(fn, expect, tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(BltError) as e:
        fn(tmp_path) if fn.__code__.co_argcount and "tmp" in fn.__code__.co_varnames[:1] else fn()
    message = str(e.value)
    assert "\n" not in message and expect in message, message
    del before  # the API cases only write their own inputs under tmp_path


# ---- run folders: markers, locks, resume, faults ------------------------------------------------------
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"{i}: {TEXT}" for i in range(8)))
    return path


def entropy_run(data, out, *extra) -> list[str]:
    fixed = "--preset tiny --seq-len 64 --log-every 1 --eval-every 1000 --ckpt-every 2 --device cpu".split()
    return ["train-entropy", "--data", str(data), "--out", str(out), *fixed, *map(str, extra)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_demo_replaces_only_its_own_folder(tmp_path):
    from blt.rundir import claim

    own = claim(tmp_path / "demo", "demo", "blt demo")
    (own / "old-output.txt").write_text("from the last demo")
    claim(own, "demo", "blt demo", replace=True)
    assert sorted(p.name for p in own.iterdir()) == [".blt-run"]
    other = claim(tmp_path / "train", "blt-run", "blt train")
    (other / "run.json").write_text("{}")
    before = snapshot(other)
    with pytest.raises(BltError, match="made by blt train"):
        claim(other, "demo", "blt demo", replace=True)
    assert snapshot(other) == before


def test_demo_without_pydoc_data_imports_nothing(tmp_path):
    """With pydoc_data absent (a standard library without it), the demo still runs: it reads the other modules'
    docstrings and comments as files and imports none of them (an `aaa_evil.py` among them is never run)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    fake = tmp_path / "stdlib"
    fake.mkdir()
    for name in ("argparse", "typing", "textwrap", "shutil", "pathlib", "inspect", "subprocess", "tarfile"):
        (fake / f"corpus_src_{name}.py").write_text((stdlib / f"{name}.py").read_text(encoding="utf-8"))
    (fake / "aaa_evil.py").write_text(
        '"""A module whose import runs code: it leaves a file behind, which the test looks for. ' * 3 + '"""\n'
        "open('EXECUTED', 'w').write('oops')\n"
    )
    script = f"""
import json, sys
from pathlib import Path
import blt.experiments.corpus as corpus
corpus.stdlib_dir = lambda: Path({str(fake)!r})  # a standard library without pydoc_data
from blt.cli import main
before = set(sys.modules)
code = main(['demo', '--out', {str(tmp_path / "demo")!r}, '--entropy-steps', '2', '--blt-steps', '2'])
print(json.dumps({{'code': code, 'new': sorted(set(sys.modules) - before)}}))
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{fake}"}  # the fake modules are importable
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, out.stderr
    assert not [m for m in result["new"] if m.startswith(("corpus_src_", "aaa_evil", "pydoc_data"))]
    assert not (tmp_path / "EXECUTED").exists()
    assert (tmp_path / "demo" / "blt" / "model.safetensors").is_file()
    assert "corpus_src_argparse" in " ".join(p.name for p in (tmp_path / "demo" / "corpus").iterdir())


def test_resume_honours_max_steps_and_refuses_changes(tmp_path, capsys):
    """`--resume --max-steps N` trains to N and records it; flags that would change the model or the data are
    refused naming each field with both values. Each metrics line is written once (one final line)."""
    data = corpus(tmp_path)
    straight, grown = tmp_path / "straight", tmp_path / "grown"
    assert main(entropy_run(data, straight, "--max-steps", 8)) == 0
    assert main(entropy_run(data, grown, "--max-steps", 4)) == 0
    capsys.readouterr()
    changes = (("--preset", "demo", "preset"), ("--seq-len", "128", "seq_len"), ("--lr", "0.5", "lr"),
               ("--seed", "3", "seed"), ("--split", "tail", "split"))  # fmt: skip
    for flag, value, field in changes:
        args = entropy_run(data, grown, "--resume", "--max-steps", 8)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{field} (saved " in err and len(err.strip().splitlines()) == 1, err
    assert main(entropy_run(data, grown, "--resume", "--max-steps", 8)) == 0
    run = json.loads((grown / "run.json").read_text())
    assert run["train"]["max_steps"] == 8
    steps = [r["step"] for r in records(grown) if "loss" in r]
    assert steps == list(range(1, 9))  # each step logged once, to N
    assert sum(1 for r in records(grown) if r.get("final")) == 1
    # the checkpoint at step 4 lies in the warmup (5 steps), where the schedule does not depend on max_steps: the
    # grown run equals the straight 8-step run exactly
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(grown / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(grown) if "loss" in r] == [r["loss"] for r in records(straight) if "loss" in r]


def test_resume_past_warmup_follows_the_new_schedule(tmp_path):
    """Past the warmup the cosine is re-planned for the new length: from the resumed step on, the learning rate is
    exactly the M-step schedule's (the earlier steps followed the N-step one, so the runs are not equal)."""
    data = corpus(tmp_path)
    out = tmp_path / "run"
    assert main(entropy_run(data, out, "--max-steps", 6)) == 0
    assert main(entropy_run(data, out, "--resume", "--max-steps", 10)) == 0
    cfg = TrainConfig(**json.loads((out / "run.json").read_text())["train"])
    assert cfg.max_steps == 10
    lrs = {r["step"]: r["lr"] for r in records(out) if "lr" in r}
    assert all(abs(lrs[s] - cfg.lr * cfg.lr_at(s)) < 1e-12 for s in range(7, 11))


def test_failed_start_can_be_rerun_and_foreign_out_is_refused(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    assert main(entropy_run(tmp_path / "missing.txt", out, "--max-steps", 2)) == 2
    assert main(entropy_run(data, out, "--max-steps", 2)) == 0  # nothing blocks the rerun
    capsys.readouterr()
    assert main(entropy_run(data, out, "--max-steps", 2)) == 2
    assert "--resume" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(entropy_run(data, mine, "--max-steps", 2)) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_second_training_into_one_folder_stops_at_once(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "blt.cli", *entropy_run(data, out, "--max-steps", 100000)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        start = time.time()
        assert main(entropy_run(data, out, "--max-steps", 2)) == 2
        assert time.time() - start < 5
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


def test_disk_full_during_a_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG) hits the writes at step 4 (the
    best model of the validation there, or the checkpoint): one line, exit 2, no temporaries, step 2 intact;
    resuming without the limit then works."""
    data = corpus(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "blt.cli"]
    subprocess.run(cmd + entropy_run(data, out, "--max-steps", 2), check=True, capture_output=True, env=env)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    full = subprocess.run(cmd + entropy_run(data, out, "--resume", "--max-steps", 4), capture_output=True, text=True,
                          env=env, preexec_fn=limit)  # fmt: skip
    assert full.returncode == 2, full.stderr
    lines = [line for line in full.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    assert ("could not write a checkpoint" in lines[0] and "step-00000002 is intact" in lines[0]) or (
        "could not write the best model" in lines[0] and "the checkpoints are intact" in lines[0]
    )
    assert "Traceback" not in full.stderr
    assert not list(out.rglob(".tmp*"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    subprocess.run(cmd + entropy_run(data, out, "--resume", "--max-steps", 4), check=True, capture_output=True, env=env)
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]


def test_damaged_checkpoint_and_log_fall_back(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    assert main(entropy_run(data, out, "--max-steps", 4)) == 0
    trainer = out / "checkpoints" / "step-00000004" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])  # truncated
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a torn line
    capsys.readouterr()
    assert main(entropy_run(data, out, "--resume", "--max-steps", 6)) == 0
    assert "step-00000004 is damaged" in capsys.readouterr().err
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_naming_the_step(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    assert main(entropy_run(data, out, "--max-steps", 30, "--lr", "1e30", "--warmup-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the loss is" in err and "at step" in err and "Traceback" not in err


def test_memory_estimate_refuses_before_allocating(tmp_path, capsys):
    data = corpus(tmp_path)
    start = time.time()
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "big"), "--preset", "blt-1b", "--patching",
                 "static", "--batch-size", "4096"])  # fmt: skip
    assert code == 2 and time.time() - start < 1.0
    err = capsys.readouterr().err
    assert "needs about" in err and "--force" in err
    assert not (tmp_path / "big" / "run.json").exists()


def test_long_prompt_is_refused_before_any_forward_pass(base, monkeypatch, capsys):
    from blt.model.blt import BLT as Network

    monkeypatch.setattr(Network, "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    assert main(["generate", "--model", str(base / "model"), "x" * 1_000_000]) == 2
    assert "1000000 bytes" in capsys.readouterr().err


def test_eval_split_val_uses_the_runs_own_split(tmp_path, capsys):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    assert main(entropy_run(data, out, "--max-steps", 2, "--val-fraction", "0.3", "--split", "tail")) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(data), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["bpb"] - json.loads((out / "summary.json").read_text())["bpb"]) < 1e-5


def test_compare_refuses_results_of_other_data(tmp_path):
    from blt.experiments.compare import check_fingerprint
    from blt.rundir import claim

    data, other = corpus(tmp_path), tmp_path / "other.txt"
    other.write_text(TEXT * 3)
    out = claim(tmp_path / "cmp", "compare", "blt compare")
    settings = dict(seq_len=64, batch_size=4, bpe_vocab=300, val_fraction=0.1, split="auto", entropy_steps=5)
    check_fingerprint(out, [str(data)], **settings)
    check_fingerprint(out, [str(data)], **settings)  # the same: results may be reused
    with pytest.raises(BltError, match="data_sha256"):
        check_fingerprint(out, [str(other)], **settings)
    with pytest.raises(BltError, match=r"seq_len \(stored 64, now 128\)"):
        check_fingerprint(out, [str(data)], **dict(settings, seq_len=128))


def test_literal_paths_before_globs_and_stop_strings(tmp_path):
    odd = tmp_path / "notes [draft].txt"
    odd.write_text("bracketed name")
    assert read_documents([str(odd)])[0].data == b"bracketed name"
    assert StopChecker("the").stops == [b"the"]  # one stop string, not three characters
    from blt.cli import stop_bytes

    assert stop_bytes("\\n\\nQ:") == b"\n\nQ:" and stop_bytes("\\xff\\x00") == b"\xff\x00"
