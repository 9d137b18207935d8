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
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blt
from blt.cli import main
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.errors import BltError
from blt.inference.sampling import StopChecker, check_generation_args
from blt.training import data as data_module
from blt.training.data import read_documents
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
                    ("--split", "test"), ("--device", "tpu")):  # fmt: skip
    case(f"eval{flag}={value}", ["eval", "--model", "{base}/model", "--data", "{base}/text.txt", flag, value],
         repr(value))  # fmt: skip
case("eval--split-val-without-run", "eval --model {base}/model --data {base}/text.txt --split val".split(), "run.json")
case("eval--seq-len-beyond-model", "eval --model {base}/model --data {base}/text.txt --seq-len 100000".split(),
     "100000")  # fmt: skip
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
api("stop=[1]", lambda: StopChecker([1]), "1")


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
