"""The `blt` command: a thin layer over the Python API, one subcommand per job.

User mistakes (bad paths, bad input, bad checkpoints) print one line naming the problem and exit
with status 2; Ctrl-C exits with 130. Neither prints a traceback.
"""

from __future__ import annotations

import argparse
import sys

from blt.errors import BltError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _convert(args) -> None:
    from blt.checkpoint import convert

    convert(args.src, args.dst, to=args.to, entropy_model=args.entropy_model)
    print(f"wrote {args.dst} ({'our format' if args.to == 'ours' else 'transformers BltForCausalLM layout'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blt", description="Byte Latent Transformer: train, evaluate, generate, inspect.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("convert", help="convert a model directory between formats", description=(
        "Read a model directory in any supported layout (ours, transformers' BltForCausalLM, the official release's "
        "params.json + consolidated.pth or config.json {args} + model.safetensors) and write it as ours or as transformers'."
    ))
    p.add_argument("src", help="model directory to read")
    p.add_argument("dst", help="directory to write")
    p.add_argument("--to", choices=["ours", "hf"], default="ours", help="output layout (default: ours)")
    p.add_argument("--entropy-model", help="entropy model directory, when it does not sit beside the weights")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BltError as e:
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\nblt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
