"""benchmarks/gpu_check.sh cannot be broken on the day a GPU is lent: its dry mode walks every step
(tests, the sanitizer's workload, the benchmark levels, the tuner, the CUDA export test) on tiny sizes
and packs one archive; the sanitizer's workload (tests/sanitize.py) catches a wrong output and a
wrong gradient. GPU_CHECK_STEPS runs a chosen few of its steps and refuses a name it lacks."""

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from xclip_fast import mlp, ops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _gpu_image_release() -> bool:
    """Whether this is the oldest supported pair, the release of the GPU machine's image, on which the
    script will run (the dry walk takes over two minutes: CI walks it once, under that pair)."""
    from xclip_fast.versions import TORCH_MIN, release

    return release(torch.__version__)[:2] == TORCH_MIN


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script itself runs the real check")
@pytest.mark.skipif(not _gpu_image_release(), reason="walked under the oldest supported torch, the GPU image's "
                    "release (CI runs the suite under both)")
def test_dry_run_walks_every_step_and_packs_one_archive(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "XCLIP_FAST_COMMIT": "test"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu-check.tar.gz", "summary.txt"]  # the device returns <= 8 files
    summary = (tmp_path / "summary.txt").read_text()
    steps = ("lab", "tests", "sanitize", "bench-attention", "bench-block", "bench-block-compiled", "tune",
             "bench-encoder", "bench-train", "export-cuda")
    for step in steps:
        assert f"== {step} (limit" in summary, step
    assert summary.count("rc=0 in") == len(steps) and "0 step(s) failed, dry=1, commit test" in summary
    assert "memcheck: NOT RUN (no CUDA device" in summary  # said, not passed off as a clean memcheck
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert "xclip-fast lab - " in summary  # the lab's short table, copied into the summary
    for name in ("device.txt", "summary.txt", "lab/table.txt", "lab/lab.json", "lab.log", "tests.log", "junit.xml",
                 "bench/results.csv", "tune/tuned.json", "tune/tune.csv", "bench-encoder.log", "bench-train.log",
                 "sanitize.log", "export-cuda.log"):
        assert name in names, name


def _sanitize_module():
    spec = importlib.util.spec_from_file_location("sanitize", Path(__file__).with_name("sanitize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _WrongGradient(torch.autograd.Function):
    """Identity forward; backward scales the gradient by 1 + 1e-4 (an error far above fp32 rounding)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-4)


@pytest.mark.triton
def test_sanitize_workload_catches_a_wrong_output_and_a_wrong_gradient(monkeypatch, capsys):
    sanitize = _sanitize_module()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    everything = list(sanitize.cases(device, quick=True))
    assert {p[0] for kind, p in everything if kind == "attention"} == {"plain", "packed"}
    assert {p[-1] for kind, p in everything if kind == "attention"} == {False, True}  # the extra token or not
    assert any(kind == "quick_gelu" for kind, _ in everything)
    # fp32: one packed-tile length (T = 7), both entries, with the extra token or not; QuickGELU
    picked = [(kind, p) for kind, p in everything
              if (kind == "quick_gelu" and p[0] == torch.float32) or (p[1] == torch.float32 and p[4] == 7)]
    monkeypatch.setattr(sanitize, "cases", lambda device, quick: iter(picked))
    assert sanitize.main(["--quick"]) == 0
    assert "5/5 cases within their bounds" in capsys.readouterr().out

    # errors planted in the triton backend only (the torch backend is PyTorch's own computation)
    attention, packed, quick_gelu = ops.attention, ops.packed_attention, mlp.quick_gelu

    def planted(fn, error):
        return lambda *a, **k: error(fn(*a, **k)) if k["backend"] == "triton" else fn(*a, **k)

    monkeypatch.setattr(ops, "packed_attention", planted(packed, lambda y: y * (1 + 1e-4)))
    monkeypatch.setattr(ops, "attention", planted(attention, _WrongGradient.apply))
    monkeypatch.setattr(mlp, "quick_gelu", planted(quick_gelu, _WrongGradient.apply))
    assert sanitize.main(["--quick"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    packed_lines = [line for line in lines if line.startswith("MISMATCH attention packed")]
    gradient_lines = [line for line in lines if line.startswith(("MISMATCH attention plain", "MISMATCH quick_gelu"))]
    assert len(packed_lines) == 2 and len(gradient_lines) == 3, out
    assert all("worst out" not in line for line in gradient_lines), out  # caught by a gradient alone
    assert "0/5 cases within their bounds" in out


def test_step_list_names_every_step_of_the_script():
    """GPU_CHECK_STEPS is checked against ALL_STEPS: a step missing from the list could not be chosen,
    a name listed but never run would be accepted and then run nothing."""
    text = SCRIPT.read_text()
    listed = re.search(r'ALL_STEPS="([^"]*)"', text).group(1).split()
    gpu_path = text.split("exit $((FAILED > 0))", 1)[1]  # the steps after the dry branch
    run = re.findall(r"^step (\S+) \d+ ", gpu_path, flags=re.M)
    assert listed == run
    dry = set(re.findall(r"^  step (\S+) \d+ ", text.split("exit $((FAILED > 0))", 1)[0], flags=re.M))
    assert dry and dry <= set(listed)


@pytest.mark.parametrize("steps, said", [("bench-block,tunes", "no step named 'tunes'"), (",", "names no step")])
def test_unknown_or_no_step_name_stops_before_anything_runs(tmp_path, steps, said):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "GPU_CHECK_STEPS": steps}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert said in proc.stderr and "bench-train-graphs" in proc.stderr  # the valid names are listed
    assert not (tmp_path / "out").exists()  # nothing installed, run or packed


@pytest.mark.skipif(not _gpu_image_release(), reason="walked under the oldest supported torch, the GPU image's "
                    "release (CI runs the suite under both)")
def test_chosen_steps_run_and_the_others_are_said_skipped(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "XCLIP_FAST_COMMIT": "test",
           "GPU_CHECK_STEPS": "export-cuda,tune"}  # the two cheapest dry steps (about 10 s together)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "== export-cuda (limit" in summary and "== tune (limit" in summary
    # in the script's order, not the variable's
    assert summary.index("== tune (limit") < summary.index("== export-cuda (limit")
    for step in ("tests", "sanitize", "bench-attention", "bench-block", "bench-block-compiled", "bench-encoder",
                 "bench-train"):
        assert f"== {step}: SKIPPED (not in GPU_CHECK_STEPS)" in summary, step
    assert summary.count("rc=0 in") == 2 and "0 step(s) failed, dry=1, commit test" in summary
    assert "dry=1, steps=export-cuda,tune," in summary  # the choice is in the device facts
