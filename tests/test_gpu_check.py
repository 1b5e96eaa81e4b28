"""benchmarks/gpu_check.sh cannot be broken on the day a GPU is lent: its dry mode walks every step
(tests, the three benchmark levels, the tuner) on tiny sizes and packs one archive."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script itself runs the real check")
def test_dry_run_walks_every_step_and_packs_one_archive(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "XCLIP_FAST_COMMIT": "test"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu-check.tar.gz", "summary.txt"]  # the device returns <= 8 files
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("tests", "bench-attention", "bench-block", "bench-block-compiled", "tune", "bench-encoder",
                 "bench-train"):
        assert f"== {step} (limit" in summary, step
    assert summary.count("rc=0 in") == 7 and "0 step(s) failed, dry=1, commit test" in summary
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    for name in ("device.txt", "summary.txt", "tests.log", "junit.xml", "bench/results.csv", "tune/tuned.json",
                 "tune/tune.csv", "bench-encoder.log", "bench-train.log"):
        assert name in names, name
