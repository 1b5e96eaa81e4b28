"""The xclip-fast command."""

import subprocess
import sys

import pytest
import torch

from xclip_fast.cli import main


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "xclip_fast.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "{check,bench,encode,export}" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--frames", "0"], "argument --frames: must be >= 1, got 0"),
    (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["--heads", "3"], "--width 128 must be divisible by --heads 3"),
    (["--batch", "two"], "argument --batch: expected an integer, got 'two'"),
])
def test_check_arguments_are_validated(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_check_judges_bf16_against_the_originals_own_error(capsys):
    """bf16 is far from float64 for the original block too; the fast block passes when it is within
    2x of the original's own error (it used to FAIL against the fixed bf16 tolerance)."""
    assert main(["check", "--backends", "torch", "--dtype", "bfloat16", "--tokens", "50", "--width", "128"]) == 0
    out = capsys.readouterr().out
    assert "torch    ok  : output" in out and "original" in out


def test_check_passes_and_prints_errors(capsys):
    assert main(["check", "--backends", "torch", "--tokens", "5", "--frames", "3", "--width", "64"]) == 0
    out = capsys.readouterr().out
    assert "torch    ok  : output" in out and "grad x" in out


CUDA_MISSING = [] if torch.cuda.is_available() else [
    (["check", "--device", "cuda"], "argument --device: device 'cuda': CUDA is not available"),
    (["bench", "--device", "cuda"], "argument --device: device 'cuda': CUDA is not available"),
]


@pytest.mark.parametrize("argv, message", [
    (["check", "--backends", "nope"], "argument --backends: expected a comma list of torch,triton, got 'nope'"),
    (["check", "--device", "meta"], "argument --device: device 'meta' is not supported"),
    (["check", "--device", "bogus"], "argument --device: unknown device 'bogus'"),
    (["bench", "--frames", "0"], "argument --frames: every frame count must be >= 1, got 0"),
    (["bench", "--frames", "abc"], "argument --frames: expected a comma list of ints >= 1, got 'abc'"),
    (["bench", "--frames", "4,-2"], "argument --frames: every frame count must be >= 1, got -2"),
    (["bench", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    *CUDA_MISSING,
])
def test_options_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_out_must_be_a_folder(tmp_path, capsys):
    out = tmp_path / "results.csv"
    out.write_text("a file")
    assert main(["bench", "--out", str(out), "--level", "attention", "--quick"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "a file"
