"""The `blt` command: a thin layer over the Python API, one subcommand per job.

User mistakes (bad paths, bad input, bad checkpoints) print one line naming the problem and exit
with status 2; Ctrl-C exits with 130. Neither prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from blt.config import BLTConfig
from blt.errors import BltError
from blt.experiments.compare import MODELS, run_compare
from blt.experiments.demo import BLT_STEPS, ENTROPY_STEPS, run_demo
from blt.experiments.visualize import patch_html, patch_png, patch_view, terminal
from blt.flops import flops_per_byte, format_table
from blt.inference import score
from blt.inference.speculative import DRAFTS, SpeculationStats
from blt.memory import blt_stacks, blt_units, device_bytes, gib
from blt.presets import BLT_PRESETS, ENTROPY_PRESETS
from blt.tokenizer import StreamDecoder
from blt.training.loop import PRECISIONS
from blt.training.parallel import PARALLEL
from blt.training.recipes import evaluate_model, export_checkpoint, resolve_model_dir, train_blt, train_entropy
from blt.weights import convert, load_blt

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
MAX_SEED = 2**63 - 1


# ---- argument types: a bad value is refused at parse time, naming it -----------------------------------
def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def seed_int(text: str) -> int:
    value = _number(int, text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed in [0, 2**63 - 1]")
    return value


def finite_float(text: str) -> float:
    return _number(float, text)


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def probability(text: str) -> float:
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in (0, 1]")
    return value


def fraction(text: str) -> float:
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1)")
    return value


def temperature(text: str) -> float:
    value = _number(float, text)
    if value != 0 and not 1e-4 <= value <= 1e4:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 (greedy) or a temperature in [1e-4, 1e4]")
    return value


def device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N or mps)")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    if text.startswith("cuda:") and int(text[5:]) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices")
    if text == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("'mps' is not available on this machine")
    return text


def stop_bytes(text: str) -> bytes:
    r"""A --stop string with escapes: \n \t \r \\ and \xNN (any byte); other characters as UTF-8 (or the
    bytes the shell gave)."""
    raw, out, i = os.fsencode(text), bytearray(), 0
    escapes = {ord("n"): 10, ord("t"): 9, ord("r"): 13, ord("\\"): 92, ord("0"): 0}
    while i < len(raw):
        if raw[i] == 92 and i + 1 < len(raw):
            c = raw[i + 1]
            if c in escapes:
                out.append(escapes[c])
                i += 2
                continue
            if c == ord("x"):
                digits = raw[i + 2 : i + 4]
                if len(digits) != 2 or not re.fullmatch(rb"[0-9a-fA-F]{2}", digits):
                    raise argparse.ArgumentTypeError(f"{text!r}: \\x needs two hex digits")
                out.append(int(digits, 16))
                i += 4
                continue
        out.append(raw[i])
        i += 1
    if not out:
        raise argparse.ArgumentTypeError("a --stop string cannot be empty")
    return bytes(out)


def _read_stdin() -> bytes:
    if sys.stdin is None or sys.stdin.closed:
        raise BltError("stdin is closed; give the text as an argument or a file")
    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError) as e:
        raise BltError(f"cannot read stdin: {e}") from None


def _convert(args) -> None:
    convert(args.src, args.dst, to=args.to, entropy_model=args.entropy_model)
    print(f"wrote {args.dst} ({'our format' if args.to == 'ours' else 'transformers BltForCausalLM layout'})")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help=(
            "text files, directories or globs (.txt, .jsonl with a 'text' field, .gz, .parquet, any bytes), "
            "datasets save_to_disk folders, hf://datasets/NAME[:split]"
        ),
    )
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl and the final model")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (default: the preset's)")
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        help="stop after this much training time (a checkpoint and the model are written)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue the run in --out from its last checkpoint; --max-steps, --max-minutes and the "
            "--*-every cadences apply, flags that would change the model or the data must equal the saved run's"
        ),
    )
    p.add_argument("--batch-size", type=positive_int, help="sequences per optimizer step (summed over ranks)")
    p.add_argument("--grad-accum", type=positive_int, help="gradient accumulation steps")
    p.add_argument("--seq-len", type=positive_int, help="bytes per training sequence")
    p.add_argument("--lr", type=positive_float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=positive_int)
    p.add_argument("--eval-every", type=positive_int, help="validate every N steps")
    p.add_argument("--ckpt-every", type=positive_int, help="checkpoint every N steps")
    p.add_argument("--log-every", type=positive_int, help="write metrics every N steps")
    p.add_argument("--seed", type=seed_int)
    p.add_argument(
        "--patience",
        type=positive_int,
        help="stop after this many validations without a better validation bpb (default: train to --max-steps)",
    )
    p.add_argument("--val-fraction", type=fraction, help="held-out share (default 0.1)")
    p.add_argument(
        "--split",
        choices=["auto", "document", "tail"],
        help="hold out whole documents, or the tail of each (auto, the default: documents when there are >= 20)",
    )
    p.add_argument("--device", type=device, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="train even when the memory estimate exceeds what is free")
    p.add_argument(
        "--parallel",
        choices=PARALLEL,
        help="under torchrun: ddp (default) replicates the model on every rank, fsdp shards it (FSDP2, sharded "
        "checkpoints, resumable at another world size; one process trains it whole and writes sharded checkpoints), "
        "none refuses more than one process",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each transformer block's activations in backward instead of keeping them",
    )
    p.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile each transformer block for training"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto (default): bfloat16 autocast on CUDA, float32 on a CPU; bf16: autocast on a CPU too (faster on "
        "CPUs with AMX or AVX512-BF16; weights and optimizer stay float32); fp32 everywhere",
    )
    _add_corpus_options(p)


def _add_corpus_options(p: argparse.ArgumentParser) -> None:
    """What --data reads from Parquet files, datasets and Hub datasets (`read_documents`)."""
    p.add_argument("--text-field", help="the column holding the text in Parquet files and datasets (default: text)")
    p.add_argument(
        "--max-bytes", type=positive_int, help="read at most this many bytes of documents (a Hub dataset streams)"
    )


def _corpus(args) -> dict:
    return {"text_field": args.text_field, "max_bytes": args.max_bytes}


def _overrides(args) -> dict:
    keys = (
        "max_steps",
        "max_minutes",
        "batch_size",
        "grad_accum",
        "seq_len",
        "lr",
        "warmup_steps",
        "eval_every",
        "ckpt_every",
        "log_every",
        "seed",
        "patience",
        "parallel",
        "activation_checkpointing",
        "compile",
        "precision",
    )
    return {k: getattr(args, k) for k in keys}


def _export(args) -> None:
    ckpt = export_checkpoint(args.checkpoint, args.dst)
    print(f"wrote {args.dst} from {ckpt} (load it with blt.load_pretrained)")


def _train_entropy(args) -> None:
    result = train_entropy(
        args.data,
        args.out,
        preset=args.preset,
        resume=args.resume,
        val_fraction=args.val_fraction,
        split=args.split,
        device=args.device,
        force=args.force,
        **_corpus(args),
        **_overrides(args),
    )
    if result:
        print(
            f"entropy model written to {args.out}: validation bpb {result['bpb']:.3f} (unigram "
            f"{result['unigram_bpb']:.3f})"
        )


def _train(args) -> None:
    result = train_blt(
        args.data,
        args.out,
        entropy_model=args.entropy_model,
        patching=args.patching,
        target_patch_bytes=args.target_patch_bytes,
        threshold=args.threshold,
        preset=args.preset,
        resume=args.resume,
        val_fraction=args.val_fraction,
        split=args.split,
        bpe_vocab=args.bpe_vocab,
        cache_dir=args.cache_dir,
        device=args.device,
        force=args.force,
        **_corpus(args),
        **_overrides(args),
    )
    if result and "bpb" in result:
        print(
            f"BLT written to {args.out}: validation bpb {result['bpb']:.3f} (unigram {result['unigram_bpb']:.3f}), "
            f"mean patch {result.get('mean_patch_bytes', float('nan')):.2f} bytes"
        )


def _eval(args) -> None:
    r = evaluate_model(
        _model_dir(args),
        args.data,
        split=args.split,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        text_field=args.text_field or "text",
        max_bytes=args.max_bytes,
        context=args.context,
    )
    if args.json:
        print(json.dumps(r))
    else:
        print(f"bits per byte       {r['bpb']:.4f}")
        print(f"bytes scored        {r['n_bytes']}")
        if "mean_patch_bytes" in r:
            print(f"mean patch bytes    {r['mean_patch_bytes']:.3f}")
        print(f"inference FLOPs/byte {r['flops_per_byte']:.4g}")
        verdict = "the model beats xz" if r["bpb"] < r["xz_bpb"] else "the model LOSES to xz on this text"
        print(f"xz -9 bits per byte {r['xz_bpb']:.4f}  ({verdict})")


def _flops(args) -> None:
    if args.model:
        model = _load_blt(args, "cpu")
        config, entropy = model.config, (model.entropy_model.config if model.entropy_model is not None else None)
    else:
        try:
            raw = json.loads(open(args.config).read())
        except json.JSONDecodeError as e:
            raise BltError(f"{args.config} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise BltError(f"{args.config} must hold a JSON object (a BLT config), not {type(raw).__name__}")
        raw.pop("model_type", None)
        config, entropy = BLTConfig.from_dict(raw), None
    patch = args.mean_patch_bytes or config.patching.patch_size
    report = flops_per_byte(config, args.seq_bytes, patch, entropy)
    if args.json:
        print(json.dumps({"seq_bytes": args.seq_bytes, "mean_patch_bytes": patch, **report}))
    else:
        print(f"FLOPs per byte at {args.seq_bytes} bytes per sequence, {patch:g} bytes per patch\n")
        print(format_table(report))


def _memory(args) -> None:
    config, hyper = BLT_PRESETS[args.preset]
    world = args.world_size
    batch = args.batch_size or -(-max(hyper.batch_size, world) // world) * world  # the preset's, a multiple of world
    if batch % world:
        raise BltError(f"--batch-size {batch} is not divisible by the {world} devices")
    seq_len = args.seq_len or hyper.seq_len
    units, stacks = blt_units(config), blt_stacks(config, seq_len, args.mean_patch_bytes)
    modes = [args.parallel] if args.parallel else ["ddp", "fsdp"]
    table = {
        mode: device_bytes(
            units,
            stacks,
            config.vocab_size,
            seq_len,
            batch // world,
            world,
            mode,
            bf16=not args.fp32,
            activation_checkpointing=args.activation_checkpointing,
        )
        for mode in modes
    }
    if args.json:
        print(json.dumps({"params": sum(units), "world_size": world, "batch_size": batch, "seq_len": seq_len, **table}))
        return
    print(
        f"{args.preset}: {sum(units) / 1e9:.2f}B parameters, {world} device(s), batch {batch} x {seq_len} bytes "
        f"({batch // world} per device), {'fp32' if args.fp32 else 'bf16 mixed precision'}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}\n"
    )
    print(f"{'per device':<16}" + "".join(f"{mode:>12}" for mode in modes))
    for part in table[modes[0]]:
        print(f"{part:<16}" + "".join(f"{gib(table[mode][part]):>12}" for mode in modes))
    print(f"{'total':<16}" + "".join(f"{gib(sum(table[mode].values())):>12}" for mode in modes))


def _demo(args) -> None:
    run_demo(args.out, entropy_steps=args.entropy_steps, blt_steps=args.blt_steps, precision=args.precision)


def _generate(args) -> None:
    model = _load_blt(args, args.device)
    prompt = _read_stdin() if args.prompt == "-" else os.fsencode(args.prompt)  # bytes as given, even invalid UTF-8
    limit = model.config.max_encoder_seq_length
    if len(prompt) + 2 > limit:  # checked before any forward pass
        raise BltError(f"the prompt has {len(prompt)} bytes; this model reads at most {limit} (max_encoder_seq_length)")
    out = sys.stdout.buffer
    decoder = StreamDecoder()
    kwargs = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stop_at_eos=not args.no_stop_at_eos,
        compile=args.compile,
        speculate=args.speculate,
        draft=args.draft,
        stats=SpeculationStats(),
    )
    try:
        if not args.raw and not args.no_prompt:
            out.write(decoder.feed(prompt).encode())
            out.flush()
        for (piece,) in model.stream([prompt], args.max_new_bytes, **kwargs):
            if piece:
                out.write(piece if args.raw else decoder.feed(piece).encode())
                out.flush()
    finally:  # on Ctrl-C too: whatever was generated is written
        if not args.raw:
            out.write((decoder.flush() + "\n").encode())
        out.flush()
        if kwargs["stats"].passes:  # it ran (on Ctrl-C too)
            print(kwargs["stats"].summary(), file=sys.stderr)


def _score(args) -> None:
    model = _load_blt(args, args.device)
    if args.file == "-":
        data = _read_stdin()
    else:
        try:
            data = open(args.file, "rb").read()
        except FileNotFoundError:
            raise BltError(f"{args.file}: no such file") from None
    limit = model.config.max_encoder_seq_length
    if args.max_forward is not None and args.max_forward > limit:
        raise BltError(f"--max-forward {args.max_forward} exceeds this model's max_encoder_seq_length {limit}")
    logp, is_byte = score(model, data, args.max_forward)
    n_bytes = int(is_byte.sum())
    bpb = float(-logp.sum() / max(n_bytes, 1))
    if args.per_byte:
        offset = 0
        for lp, b, target in zip(logp.tolist(), is_byte.tolist(), model.encode(data)[1:].tolist()):
            if b:
                ch = chr(target - 4) if 32 <= target - 4 < 127 else "."
                print(f"{offset}\t{target - 4:02x}\t{ch}\t{lp:.4f}")
                offset += 1
    if args.json:
        print(json.dumps({"bpb": bpb, "n_bytes": n_bytes, "bits": float(-logp.sum())}))
    else:
        print(f"bits per byte  {bpb:.4f}  ({n_bytes} bytes)")


def _model_dir(args) -> str | Path:
    """--model, or its best/ checkpoint when the run kept one (unless --final); says so on stderr. A name that is
    not a local folder is passed on as given (it may be a Hub repo id)."""
    path = resolve_model_dir(args.model, final=getattr(args, "final", False))
    if path == Path(args.model):
        return args.model
    print(f"using {path} (the best validation point; --final for the last weights)", file=sys.stderr)
    return path


def _load_blt(args, device):
    return load_blt(_model_dir(args), device=device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _compare(args) -> None:
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise BltError(f"--budgets must be comma-separated numbers such as 1e13,3e13, got {args.budgets!r}") from None
    if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
        raise BltError(f"--budgets must be positive finite FLOP counts such as 1e13,3e13, got {args.budgets!r}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    run_compare(
        args.data,
        budgets,
        models,
        args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        bpe_vocab=args.bpe_vocab,
        val_fraction=args.val_fraction,
        split=args.split,
        entropy_steps=args.entropy_steps,
        title=args.title,
        report=args.report,
        text_field=args.text_field or "text",
        max_bytes=args.max_bytes,
    )
    stem = args.report.removesuffix(".md") if args.report else f"{args.out}/compare"
    print(f"report written to {stem}.md (+ {stem}-train.png, {stem}-inference.png)")


def _patch(args) -> None:
    model = _load_blt(args, "cpu")
    if args.file:
        try:
            data = open(args.file, "rb").read()
        except FileNotFoundError:
            raise BltError(f"{args.file}: no such file") from None
    elif args.text is not None:
        data = os.fsencode(args.text)  # the bytes as given, even invalid UTF-8
    else:
        raise BltError("give a TEXT or --file")
    if not data:
        raise BltError("nothing to patch: the text is empty")
    if args.png and not args.png.lower().endswith(".png"):
        raise BltError(f"--png writes a PNG image: name it FILE.png, got {args.png!r}")
    text, byte_starts, byte_entropy, threshold = patch_view(model, data)
    print(terminal(text, byte_starts, color=sys.stdout.isatty() and not args.no_color))
    n = sum(byte_starts)
    print(
        f"{len(text)} bytes, {n} patches, {len(text) / max(n, 1):.2f} bytes per patch ({model.patcher.mode} patching)",
        file=sys.stderr,
    )
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(patch_html(text, byte_starts, byte_entropy, threshold))
    if args.png:
        if byte_entropy is None:
            raise BltError("--png plots entropies: this model has no entropy model")
        patch_png(args.png, text, byte_starts, byte_entropy, threshold)


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line on stderr (not the usage block), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blt", description="Byte Latent Transformer: train, evaluate, generate, inspect.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "convert",
        help="convert a model directory between formats",
        description=(
            "Read a model directory in any supported layout (ours, transformers' BltForCausalLM, the "
            "official release's "
            "params.json + consolidated.pth or config.json {args} + model.safetensors) and write it as ours "
            "or as transformers'."
        ),
    )
    p.add_argument("src", help="model directory to read")
    p.add_argument("dst", help="directory to write")
    p.add_argument("--to", choices=["ours", "hf"], default="ours", help="output layout (default: ours)")
    p.add_argument("--entropy-model", help="entropy model directory, when it does not sit beside the weights")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "export",
        help="write a training checkpoint's model as a model folder",
        description=(
            "Turn a training checkpoint, sharded (--parallel fsdp, any world size) or not, into config.json + "
            "model.safetensors, loadable with blt.load_pretrained. Runs in one process."
        ),
    )
    p.add_argument("checkpoint", help="a run folder (its newest complete checkpoint) or RUN/checkpoints/step-N")
    p.add_argument("dst", help="directory to write")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "train-entropy",
        help="train the entropy model (a small byte LM)",
        description="Train the byte-level entropy model whose uncertainty places patch boundaries.",
    )
    _add_training_options(p)
    p.add_argument(
        "--preset",
        choices=list(ENTROPY_PRESETS),
        help="model size and its training defaults (default: demo)",
    )
    p.set_defaults(func=_train_entropy)

    p = sub.add_parser(
        "train",
        help="train a BLT from raw text",
        description=(
            "Train a Byte Latent Transformer. With entropy patching the threshold is calibrated to "
            "--target-patch-bytes on the "
            "training data unless --threshold is given; entropies are computed once and cached on disk."
        ),
    )
    _add_training_options(p)
    p.add_argument("--entropy-model", help="entropy model directory (needed for --patching entropy)")
    p.add_argument("--patching", choices=["entropy", "static", "space", "bpe", "byte"], help="(default: entropy)")
    p.add_argument(
        "--target-patch-bytes",
        type=positive_float,
        help="mean patch size to calibrate to (static: the stride; default 4.5)",
    )
    p.add_argument("--threshold", type=finite_float, help="entropy threshold (skips calibration)")
    p.add_argument(
        "--bpe-vocab", type=positive_int, help="vocabulary of the BPE tokenizer for --patching bpe (default 1024)"
    )
    p.add_argument(
        "--preset",
        choices=list(BLT_PRESETS),
        help="model size and its training defaults (default: demo)",
    )
    p.add_argument("--cache-dir", help="where entropies are cached (default: ~/.cache/blt)")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval",
        help="bits per byte of a model on text",
        description="Bits per byte, mean patch size and FLOPs per byte of a saved model.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--final", action="store_true", help="use the last weights even when the run kept best/")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH")
    p.add_argument(
        "--split",
        choices=["all", "train", "val"],
        default="all",
        help="score everything (default) or one side of the training split",
    )
    p.add_argument(
        "--seq-len", type=positive_int, help="bytes per scored window (default: the training sequence length)"
    )
    p.add_argument(
        "--context",
        type=non_negative_int,
        default=0,
        help="bytes of context before each scored window: overlapping windows, so that every byte is predicted "
        "from at least this many, for seq-len / (seq-len - context) times the compute (default 0: non-overlapping "
        "windows; half the window is a common choice)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", type=device)
    p.add_argument("--cache-dir", help="where entropies are cached (default: ~/.cache/blt)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_corpus_options(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "flops",
        help="training and inference FLOPs per byte, by component",
        description=(
            "FLOPs per byte by component, the paper's way: matmuls at 2mnk, backward = 2x forward, embedding "
            "lookups free, "
            "attention over the keys each query really reads (real context length and window)."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory")
    src.add_argument("--config", help="a BLT config.json")
    p.add_argument("--seq-bytes", type=positive_int, default=4096, help="bytes per sequence (default 4096)")
    p.add_argument("--mean-patch-bytes", type=positive_float, help="mean patch size (default: the config's patch_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_flops)

    p = sub.add_parser(
        "memory",
        help="training memory per device for DDP and FSDP",
        description=(
            "Estimated memory per device to train a BLT preset under torchrun: parameters, gradients and AdamW "
            "moments (whole under DDP, 1/world under FSDP), communication buffers, activations and logits. "
            "A floor: allocator slack and kernels' workspaces are not counted."
        ),
    )
    p.add_argument("--preset", choices=list(BLT_PRESETS), default="blt-1b", help="model size (default blt-1b)")
    p.add_argument("--world-size", type=positive_int, default=1, help="devices (torchrun ranks), default 1")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="one strategy (default: both side by side)")
    p.add_argument("--batch-size", type=positive_int, help="sequences per step, all devices (default: the preset's)")
    p.add_argument("--seq-len", type=positive_int, help="bytes per sequence (default: the preset's)")
    p.add_argument("--mean-patch-bytes", type=positive_float, default=4.5, help="(default 4.5)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--fp32", action="store_true", help="float32 throughout (CPU) instead of CUDA's bf16")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_memory)

    p = sub.add_parser(
        "demo",
        help="train and sample a small BLT on the standard library's docs, Shakespeare and four books (no download)",
        description=(
            "The main job on an embedded corpus: the standard library's help topics, docstrings and comments, "
            "Shakespeare's plays and four public-domain books (Alice in Wonderland, a 1992 Library of Congress "
            "workshop, Paradise Lost, the Jargon File; shipped in the package). Trains an entropy model and a "
            "small BLT on CPU, prints validation bits per byte next to a unigram byte model, the mean patch size "
            "and a sample, and writes the models, patches.html, patches.png and loss.png to --out."
        ),
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        help="output directory (default runs/demo); an earlier demo run there is replaced, any other folder refused",
    )
    p.add_argument("--entropy-steps", type=positive_int, default=ENTROPY_STEPS)
    p.add_argument("--blt-steps", type=positive_int, default=BLT_STEPS)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): bfloat16 autocast where the CPU multiplies bfloat16 in hardware, else float32",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "generate",
        help="generate text byte by byte, streaming it as it comes",
        description=(
            "Generate with caches at every level (exactly what recomputing the whole model per byte gives), "
            "streaming UTF-8 "
            "to stdout as it is produced; an incomplete character is held back until complete. Ctrl-C stops cleanly."
        ),
    )
    p.add_argument("--model", required=True)
    p.add_argument("--final", action="store_true", help="use the last weights even when the run kept best/")
    p.add_argument("prompt", help='the prompt ("" starts from BOS; - reads stdin)')
    p.add_argument("--max-new-bytes", type=positive_int, default=256)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=probability)
    p.add_argument("--seed", type=seed_int)
    p.add_argument(
        "--stop",
        action="append",
        type=stop_bytes,
        help=r"stop when the output ends with these bytes (repeatable; not printed); escapes: \n \t \r \\ \xNN",
    )
    p.add_argument("--no-stop-at-eos", action="store_true", help="never produce EOS; generate --max-new-bytes")
    p.add_argument(
        "--raw", action="store_true", help="write the new bytes as they are (no prompt echo, no UTF-8 decoding)"
    )
    p.add_argument("--no-prompt", action="store_true", help="do not echo the prompt")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run compiled decoding steps (same output; the first run compiles for up to a minute, later runs load it)",
    )
    p.add_argument(
        "--speculate",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="draft K bytes at a time and verify them in one pass of the whole model (same output; 0, the default: "
        "off); prints the acceptance rate and bytes per full-model pass to stderr at the end",
    )
    p.add_argument(
        "--draft",
        choices=DRAFTS,
        default="self",
        help="what drafts with --speculate: self (default: the local encoder and decoder past the patch boundary, "
        "no global step) or entropy (the entropy model)",
    )
    p.add_argument("--device", type=device)
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "score",
        help="bits per byte of a text, optionally per byte",
        description=(
            "log2-probabilities of every byte and the bits per byte of a text; texts longer than the model's context "
            "continue through the same cached path as generation."
        ),
    )
    p.add_argument("--model", required=True)
    p.add_argument("--final", action="store_true", help="use the last weights even when the run kept best/")
    p.add_argument("file", help="text file, or - for stdin")
    p.add_argument("--per-byte", action="store_true", help="print offset, byte, character and log2 p for every byte")
    p.add_argument(
        "--max-forward",
        type=positive_int,
        help="longest text scored in one forward pass (default: the model's max_encoder_seq_length)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", type=device)
    p.set_defaults(func=_score)

    p = sub.add_parser(
        "compare",
        help="FLOP-matched comparison of BLT against BPE and byte baselines",
        description=(
            "For each training-FLOP budget, size every model by one rule (blt/experiments/compare.py), train it for "
            "exactly that budget, score "
            "it on the held-out split (clean and under seeded noise), and write DIR/compare.md with PNG "
            "plots. Finished runs are "
            "kept and not redone."
        ),
    )
    p.add_argument("--data", nargs="+", required=True, metavar="PATH")
    p.add_argument("--budgets", required=True, help="comma-separated training FLOPs, e.g. 1e13,3e13,1e14")
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)} (default: all)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=positive_int, default=512, help="bytes per training sequence (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--bpe-vocab", type=positive_int, default=1024, help="BPE vocabulary of the token baseline (default 1024)"
    )
    p.add_argument("--val-fraction", type=fraction, default=0.1)
    p.add_argument("--split", choices=["auto", "document", "tail"], default="auto")
    p.add_argument(
        "--entropy-steps",
        type=positive_int,
        default=300,
        help="training steps of the entropy model (shared by all budgets)",
    )
    p.add_argument("--title", help="report title")
    p.add_argument(
        "--report",
        help=(
            "where the report goes (FILE.md, with FILE-train.png and FILE-inference.png beside it; default "
            "OUT/compare.md)"
        ),
    )
    _add_corpus_options(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "patch",
        help="show how a model cuts a text into patches",
        description=(
            "Coloured patch boundaries in the terminal; --html writes each patch boxed with its bytes "
            "coloured by entropy "
            "(values on hover); --png plots entropy per byte with the threshold and the boundaries. Invalid "
            "UTF-8 is shown as hex."
        ),
    )
    p.add_argument("--model", required=True)
    p.add_argument("--final", action="store_true", help="use the last weights even when the run kept best/")
    p.add_argument("text", nargs="?", help="the text (or use --file)")
    p.add_argument("--file", help="read the text from a file")
    p.add_argument("--html", help="write an HTML page here")
    p.add_argument("--png", help="write the entropy plot here")
    p.add_argument("--no-color", action="store_true", help="separate patches with | instead of colours")
    p.set_defaults(func=_patch)

    p = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the model 'blt' registered",
        description=(
            "The harness's own command line (lm-eval run ...), with this package's model registered as 'blt': "
            "blt lm-eval run --model blt --model_args pretrained=DIR --tasks hellaswag. Bytes are the tokens "
            "(max_gen_toks, max_length count bytes); acc_norm divides by characters, acc_bytes by bytes. "
            "`blt lm-eval run --help` lists the harness's arguments."
        ),
    )
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="the harness's arguments")
    p.set_defaults(func=_lm_eval)

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible completions server",
        description=(
            "POST /v1/completions (max_tokens counts bytes; stream=true sends server-sent events), GET /v1/models, "
            "GET /health, POST /v1/patches (bytes, entropies, patch starts). Concurrent requests are decoded as one "
            "batch that they join on arrival and leave when done; each gets what `blt generate` gives it alone."
        ),
    )
    p.add_argument("--model", required=True, help="model directory or Hub repo id")
    p.add_argument("--entropy-model", help="entropy model directory or Hub repo id (default: the model's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="requests decoded together (default 64)")
    p.set_defaults(func=_serve)
    return parser


def _lm_eval(args) -> None:
    try:
        from blt.lm_eval import cli  # noqa: PLC0415  (optional dependency: the `lm-eval` extra; not a cycle)
    except ImportError as e:
        raise BltError(f"blt lm-eval needs lm-evaluation-harness: pip install 'blt-lm[lm-eval]' ({e})") from None
    cli(args.harness_args)


def _serve(args) -> None:
    try:
        from blt.serve import serve  # noqa: PLC0415  (optional dependency: the `serve` extra; not a cycle)
    except ImportError as e:
        raise BltError(f"blt serve needs FastAPI and uvicorn: pip install 'blt-lm[serve]' ({e})") from None
    if args.port < 0 or args.port > 65535:
        raise BltError(f"--port must be in 0..65535, got {args.port}")
    model = load_blt(args.model, entropy_model=args.entropy_model, device=args.device or "cpu")
    print(f"serving {args.model} on http://{args.host}:{args.port}", file=sys.stderr)
    serve(model, host=args.host, port=args.port, name=args.model, max_rows=args.max_batch)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"] and argv[1:] not in (["-h"], ["--help"]):  # the rest is the harness's (not ours)
        args = argparse.Namespace(command="lm-eval", func=_lm_eval, harness_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    # subnormal floats flushed to zero, set before torch starts its worker threads (they inherit it): see
    # blt.training.loop; restored on return for a caller in the same process (its threads keep what they have)
    flushing = torch.set_flush_denormal(True)
    try:
        args.func(args)
    except BltError as e:
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a path the user named: missing, forbidden, a disk that is full
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print(f"\nblt {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if flushing:
            torch.set_flush_denormal(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
