"""The xclip-fast command."""

import subprocess
import sys

import pytest

from xclip_fast.cli import main


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "xclip_fast.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "check" in proc.stdout


def test_check_passes_and_prints_errors(capsys):
    assert main(["check", "--backends", "torch", "--tokens", "5", "--frames", "3", "--width", "64"]) == 0
    out = capsys.readouterr().out
    assert "torch    ok: output" in out and "grad x" in out


def test_check_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        main(["check", "--backends", "nope", "--tokens", "3", "--frames", "2", "--width", "64"])
