"""benchmarks/gpu_lab.py cannot break before a GPU sees it: its dry mode runs every section on the CPU
at tiny sizes (our kernels in Triton's interpreter), fills every row it can, writes at most 7 files
and prints its short table last; a provider that disagrees with float32 makes the exit status 1, and
a spent budget is said case by case, not passed off as measured."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_lab.py"


def _lab():
    spec = importlib.util.spec_from_file_location("gpu_lab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the lab itself runs (gpu_check.sh's step lab)")
def test_dry_run_fills_every_section_and_prints_its_table_last(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the lab sets it itself
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(_lab().FILES) and len(files) <= 7  # a GPU machine hands back 8 files
    table = (tmp_path / "table.txt").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())  # printed last
    lab = json.loads((tmp_path / "lab.json").read_text())
    assert lab["dry_run"] and lab["environment"]["commit"] and lab["ceilings"]["copy_gbps"] > 0

    kernels = lab["kernels"]
    shapes = {(r["l"], r["N"]) for r in kernels}
    assert shapes == {(5, 2), (9, 4)}
    for l, N in shapes:
        rows = {(r["provider"], r["direction"]): r for r in kernels if (r["l"], r["N"]) == (l, N)}
        for provider in ("ours", "sdpa-flash", "sdpa-flash-alone"):
            for direction in ("fwd", "bwd"):
                r = rows[(provider, direction)]
                assert r["status"] == "ok" and r["gpu_ms"] > 0 and r["error"] <= r["tolerance"], r
                assert r["floor_bytes"] > 0 and r["tflops"] > 0 and r["host_ms"] > 0
        for kernel, direction in (("fwd", "fwd"), ("bwd", "bwd")):  # the frame attention: the sequence kernels
            r = rows[(f"ours/{kernel}", direction)]
            assert r["status"] == "ok" and r["gpu_ms"] > 0 and r["tflops"] > 0
        assert not {p for p, _ in rows if p.startswith("ours/packed")}
        # the CPU has no cuDNN or efficient attention: said, not measured
        for backend in ("cudnn", "efficient"):
            r = rows[(f"sdpa-{backend}", "fwd+bwd")]
            assert r["status"] == "skipped" and r["reason"]
        # the message token costs bytes: the floor with it is above the floor without
        assert rows[("ours", "fwd")]["floor_bytes"] > rows[("sdpa-flash-alone", "fwd")]["floor_bytes"]

    block = {r["provider"]: r for r in lab["block"]}
    assert set(block) == set(_lab().BLOCK_PROVIDERS)
    for name in ("original", "triton-none", "triton-lean", "torch-none", "torch-lean"):
        r = block[name]
        assert r["status"] == "ok" and r["error"] <= r["tolerance"], r
        assert r["wall_ms"] > 0 and r["busy_ms"] > 0 and r["graph_ms"] > 0 and r["x_eager_original"] > 0
    assert block["original-compiled"]["status"] == block["triton-compiled"]["status"] == "skipped"
    train = {r["provider"]: r for r in lab["train"]}
    assert set(train) == {"original", "xclip-fast-lean"}
    assert all(r["status"] == "ok" and r["mfu_pct"] > 0 for r in train.values()), train
    profile = (tmp_path / "profile.txt").read_text()
    for title in ("block tiny original", "block tiny triton-lean", "train tiny xclip-fast-lean"):
        assert f"== {title}: wall" in profile, title
    for heading in ("kernels: GPU ms", "block step, forward + backward", "training step", "0 failed"):
        assert heading in table, heading


@pytest.mark.triton
def test_a_provider_that_disagrees_fails_the_run(tmp_path, monkeypatch, capsys):
    lab = _lab()
    small = dict(lab.sizes(True), kernel_shapes=[(5, 2)], block_models={})
    monkeypatch.setattr(lab, "sizes", lambda dry: small)
    monkeypatch.setattr(lab, "train_section", lambda lab: None)
    providers = lab.kernel_providers

    def with_a_wrong_one():
        out = providers()
        fn, names, what = out["ours"]
        out["ours"] = (lambda s: fn(s) * 1.01, names, what)
        return out
    monkeypatch.setattr(lab, "kernel_providers", with_a_wrong_one)
    assert lab.run(tmp_path, budget=600, dry=True) == 1
    out = capsys.readouterr().out
    assert "2 failed" in out and "MISMATCH float32 5 2 ours: " in out  # forward and backward rows
    rows = json.loads((tmp_path / "lab.json").read_text())["kernels"]
    assert {r["status"] for r in rows if r["provider"] == "ours"} == {"mismatch"}
    assert all(r["status"] in ("ok", "skipped") for r in rows if r["provider"] != "ours")


def test_a_spent_budget_skips_each_case_and_says_so(tmp_path, monkeypatch, capsys):
    lab = _lab()
    monkeypatch.setattr(lab, "ceilings", lambda lab: None)
    assert lab.run(tmp_path, budget=0, dry=True) == 0
    doc = json.loads((tmp_path / "lab.json").read_text())
    rows = [r for section in ("kernels", "block", "train") for r in doc[section]]
    assert rows and all(r["status"] == "skipped" and r["reason"] == "budget spent" for r in rows)
    assert "0 failed" in capsys.readouterr().out
