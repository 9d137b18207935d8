"""The `blt` command: every subcommand has --help; user mistakes exit non-zero without a traceback."""

import subprocess
import sys

import pytest
import torch

import blt
from blt.cli import EXIT_USER_ERROR, build_parser, main
from tests.helpers import TEXT, tiny_config


def subcommands():
    parser = build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


def test_every_subcommand_has_help(capsys):
    for name in subcommands():
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        assert exit.value.code == 0
        assert "usage: blt " + name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "blt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout


def test_convert_to_hf_and_back(tmp_path, capsys):
    torch.manual_seed(0)
    model = blt.BLT(tiny_config(cross_attn_nheads=None)).eval()
    model.save_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    ids = blt.encode(TEXT[:50])[None]
    assert (blt.load_pretrained(tmp_path / "back")(ids) - model(ids)).abs().max() < 1e-6


def test_convert_bad_source_is_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("blt convert: error:") and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
