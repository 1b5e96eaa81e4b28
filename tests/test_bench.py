"""The benchmark runner (xclip-fast bench): outputs, skips with reasons, and the correctness gate."""

import csv
import json
import os

import pytest
import torch
from _helpers import one_release

from xclip_fast import bench
from xclip_fast.cli import build_parser


def _args(tmp_path, *extra):
    return build_parser().parse_args(["bench", "--out", str(tmp_path), "--device", "cpu", *extra])


def test_bench_writes_table_csv_json_and_plot(tmp_path, capsys):
    args = _args(tmp_path, "--level", "block", "--frames", "2", "--mode", "fwd",
                 "--providers", "xclip-fast-torch,xclip-fast-triton,xformers", "--quick")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "the triton provider is left out" in out
    assert "block b32 b=1 T=2" in out and "xclip-fast-torch" in out
    assert "xclip-fast-triton          SKIPPED: triton kernels need CUDA" in out
    # what backend='auto' runs for the case's two attentions, and why
    assert "backend='auto'" in out and "frame attention 50 x 2 forward eager: torch (" in out
    assert "message attention 2 x 1 forward compiled: torch (" in out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["reference", "xformers", "xclip-fast-torch", "xclip-fast-triton"]
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"reference", "xclip-fast-torch"}
    assert float(ok["reference"]["speedup"]) == 1.0 and float(ok["xclip-fast-torch"]["median_ms"]) > 0
    assert float(ok["xclip-fast-torch"]["error"]) <= float(ok["xclip-fast-torch"]["tolerance"])
    assert all(r["device"] and r["torch"] == torch.__version__ and r["commit"] for r in rows)
    skipped = {r["provider"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert skipped["xformers"] and skipped["xclip-fast-triton"]
    runs = [f for f in os.listdir(tmp_path) if f.startswith("run-") and f.endswith(".json")]
    assert len(runs) == 1
    with open(tmp_path / runs[0]) as f:
        run = json.load(f)
    assert run["environment"]["device"] and len(run["rows"]) == 4
    assert any(f.endswith(".png") for f in os.listdir(tmp_path))


def test_bench_exits_non_zero_when_a_provider_disagrees(tmp_path, monkeypatch):
    original = bench.Workload._block_provider

    def broken(self, name):
        fn = original(self, name)
        return (lambda: fn() * 1.01) if name == "xclip-fast-torch" else fn

    monkeypatch.setattr(bench.Workload, "_block_provider", broken)
    args = _args(tmp_path, "--level", "block", "--frames", "2", "--mode", "fwd", "--providers", "xclip-fast-torch",
                 "--quick")
    assert bench.main(args) == 1
    with open(tmp_path / "results.csv") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert rows["xclip-fast-torch"]["status"] == "mismatch" and rows["xclip-fast-torch"]["median_ms"] == ""


def test_an_interrupted_run_keeps_the_cases_that_finished(tmp_path, monkeypatch, capsys):
    """A time limit's SIGINT (KeyboardInterrupt) after the first case: that case's rows are in the
    table, the CSV and the run file; the exit code says the run was cut short."""
    from xclip_fast.bench import run as bench_run

    original, calls = bench_run.run_case, []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(bench_run, "run_case", second_interrupted)
    args = _args(tmp_path, "--level", "block", "--frames", "2,3", "--mode", "fwd", "--providers", "xclip-fast-torch",
                 "--quick")
    assert bench.main(args) == 130
    captured = capsys.readouterr()
    assert "interrupted: the 2 row(s) of the cases that finished follow" in captured.err
    assert "block b32 b=1 T=2" in captured.out and "block b32 b=1 T=3" not in captured.out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["provider"], r["status"]) for r in rows] == [
        ("block b32 b=1 T=2", "reference", "ok"), ("block b32 b=1 T=2", "xclip-fast-torch", "ok")]
    runs = [f for f in os.listdir(tmp_path) if f.startswith("run-") and f.endswith(".json")]
    with open(tmp_path / runs[0]) as f:
        assert len(json.load(f)["rows"]) == 2


def test_attention_cost_model_counts_the_useful_matmuls():
    """The FLOPs the bench reports for the frame attention equal what torch's FLOP counter counts for
    plain attention over l + 1 keys (QK^T and PV for the l frame-token queries only)."""
    from torch.utils.flop_counter import FlopCounterMode

    case = bench.Case("attention", "frames", "b16", 2, 8, 197, 768, 12)
    w = bench.Workload(case, torch.float32, torch.device("cpu"), grad=False)
    N, H, D, l = 16, 12, 64, 197
    q, k, v = torch.randn(N, H, l, D), torch.randn(N, H, l + 1, D), torch.randn(N, H, l + 1, D)
    with FlopCounterMode(display=False) as counter:
        torch.matmul(torch.matmul(q, k.transpose(-1, -2)).softmax(-1), v)
    assert w.flops("fwd") == counter.get_total_flops()
    # bytes: q, k, v and o of every frame token, plus the message token's k and v, in fp32
    assert w.bytes("fwd") == sum(t.numel() for t in w.leaves.values() if t is not w.leaves["q_msg"]) * 4 + \
        N * l * 768 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the half-precision case is a CPU one")
def test_bench_rejects_bad_options_in_one_line_with_exit_code_2(tmp_path, capsys):
    """As argparse does: one line on stderr, exit code 2, no traceback, nothing written."""
    from xclip_fast.cli import main

    for argv, message in ((["--providers", "flash3"], "--providers: unknown flash3; choose from reference"),
                          (["--level", "train", "--dtype", "bfloat16"], "--dtype bfloat16 on CPU"),
                          (["--level", "inference", "--providers", "tensorrt"], "unknown inference provider(s) "
                                                                                "tensorrt")):
        assert main(["bench", *argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_fast_providers_choose_their_backend_at_call_time():
    """The eager fast providers of the encoder level share one encoder; creating one after the
    other must not change what the first one runs (all providers are created before any is timed)."""
    case = bench.Case("encoder", "encoder", "b32", 1, 2, 50, 768, 12, chunk_frames=1)
    w = bench.Workload(case, torch.float32, torch.device("cpu"), grad=False)
    run = w.provider("xclip-fast-torch")
    w.enc.backend = "reference"  # what creating another provider may leave behind
    with torch.no_grad():
        run()
    assert w.enc.backend == "torch"


@pytest.mark.parametrize("level", [one_release("block", "oldest"), one_release("encoder", "newest")])
def test_compiled_providers_match_the_reference(level):
    """torch.compile of the original and of the fast modules, checked like every provider."""
    case = (bench.Case("block", "block", "b32", 1, 2, 5, 64, 2) if level == "block"
            else bench.Case("encoder", "encoder", "b32", 1, 2, 50, 768, 12))
    w = bench.Workload(case, torch.float64, torch.device("cpu"), grad=False, quick=False)
    with torch.no_grad():
        ref = w.provider("reference")()
        for name in ("reference-compiled", "xclip-fast-torch-compiled"):
            out = w.provider(name)()
            assert ((out - ref).norm() / ref.norm()).item() < 1e-10, name
    with pytest.raises(bench.Skip, match="--quick: torch.compile warm-up"):
        bench.Workload(case, torch.float64, torch.device("cpu"), grad=False, quick=True).provider(
            "xclip-fast-torch-compiled")


def test_inference_level_checks_every_provider_against_the_original(tmp_path, monkeypatch):
    """The inference level on a tiny model: each provider's output checked against the float32
    original before it is timed; a wrong provider is a mismatch, not a row of timings."""
    from xclip_fast.bench import inference
    from xclip_fast.bench.results import environment

    pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")
    tiny = dict(input_resolution=32, patch_size=16, width=128, layers=1, heads=2, embed_dim=64, num_frames=4,
                mit_heads=1)
    cpu = torch.device("cpu")
    rows = inference.inference_rows(["b32"], [3], [2], torch.float32, cpu, True, environment(cpu), str(tmp_path),
                                    providers=["reference", "xclip-fast", "onnxruntime"], overrides=tiny, memory=False)
    assert [(r.provider, r.status) for r in rows] == [("reference", "ok"), ("xclip-fast", "ok"), ("onnxruntime", "ok")]
    for r in rows:
        assert r.error <= 1e-5 and r.extras["p90_ms"] >= r.median_ms > 0
        assert r.extras["videos_per_s"] == pytest.approx(2 / (r.median_ms * 1e-3))
    assert "| b32 | 3 | 2 | float32 | onnxruntime |" in inference.inference_table(rows, environment(cpu))
    # a provider computing something else is caught: the fast encoder with one weight changed
    real = inference._Providers.build

    def wrong(self, name, T):
        fn = real(self, name, T)
        if name == "xclip-fast":
            with torch.no_grad():
                fn.visual.proj.mul_(1.01)
        return fn

    monkeypatch.setattr(inference._Providers, "build", wrong)
    rows = inference.inference_rows(["b32"], [3], [1], torch.float32, cpu, True, environment(cpu), str(tmp_path),
                                    providers=["reference", "xclip-fast"], overrides=tiny, memory=False)
    assert rows[1].status == "mismatch" and rows[1].median_ms is None


# ------------------------------------------------------------------------------------------------
# the training level's measurements (the level itself runs released sizes: the GPU check runs it)
# ------------------------------------------------------------------------------------------------
def _tiny_encoder():
    from xclip_fast.bench.train import TINY
    from xclip_fast.encoder import XCLIPVideoEncoder

    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(**TINY)
    return enc, torch.randn(2, TINY["num_frames"], 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_compiled_budget_flops_are_counted_inside_the_graphs():
    """The compiled original under activation_memory_budget: its partitioned graphs run by the
    counting backend give the eager original's FLOPs when nothing is recomputed, more under a tight
    budget (recomputed products), and its saved bytes fall with the budget. A counter around a
    compiled call would see none of it."""
    from xclip_fast.bench.memory import saved_bytes
    from xclip_fast.bench.train import Trainer

    enc, video = _tiny_encoder()
    eager = Trainer("reference", enc, torch.device("cpu"), False)
    flops0 = eager.flops(video)
    results = {}
    for budget in (1.0, 0.1):
        torch._dynamo.reset()
        tr = Trainer(f"reference-compiled-budget-{budget}", enc, torch.device("cpu"), False)
        flops = tr.flops(video)
        out, saved = saved_bytes(lambda v, tr=tr: tr.loss(v, tr.counted), video, keep=[tr.modules])
        results[budget] = (flops, saved)
    torch._dynamo.reset()
    assert results[1.0][0] == flops0, (results, flops0)
    assert results[0.1][0] > flops0 and results[0.1][1] < results[1.0][1], results


def test_host_time_and_budget_providers():
    """Host times come as (ms, ratio to the original) with the original at exactly 1; a budget
    provider is the fast encoder under that budget; no GPU idle fraction off CUDA."""
    from xclip_fast.bench.measure import gpu_idle_fraction
    from xclip_fast.bench.train import Trainer, budget_of, host_rows

    host = host_rows(["reference", "xclip-fast-lean", "xclip-fast-budget-0.3"], torch.device("cpu"), False)
    assert list(host) == ["reference", "xclip-fast-lean", "xclip-fast-budget-0.3"]
    assert host["reference"][1] == 1.0 and all(ms > 0 and ratio > 0 for ms, ratio in host.values())
    enc, _ = _tiny_encoder()
    assert budget_of("xclip-fast-budget-0.3") == 0.3 and budget_of("xclip-fast-lean") is None
    assert Trainer("xclip-fast-budget-0.3", enc, torch.device("cpu"), False).modules.recompute == 0.3
    assert gpu_idle_fraction(lambda: None, torch.device("cpu")) is None


def test_offload_provider_moves_what_the_level_keeps():
    """``xclip-fast-<level>-offload`` is the fast encoder at that level with every forward under
    save_on_cpu, counting what it moves: at least the bytes the level keeps (a tensor saved twice is
    moved twice), the parameters counted apart; left out of a CPU run, where nothing would move."""
    from xclip_fast.bench.memory import held_bytes
    from xclip_fast.bench.run import _train_providers
    from xclip_fast.bench.train import Trainer, offloads

    enc, video = _tiny_encoder()
    tr = Trainer("xclip-fast-min-offload", enc, torch.device("cpu"), False)
    assert tr.modules.recompute == "min" and offloads("xclip-fast-min-offload")
    tr.step(video)
    plain = Trainer("xclip-fast-min", enc, torch.device("cpu"), False)
    out, held = held_bytes(plain.loss, video, keep=[plain.modules])
    params = sum(p.numel() * p.element_size() for p in tr.params)
    assert 0 < tr.offload.parameters <= params
    assert tr.offload.moved - tr.offload.parameters >= held > 0
    assert not [p for p in _train_providers(None, True, False) if offloads(p)]
    assert len([p for p in _train_providers(None, False, True) if offloads(p)]) == 4


def _touches(mib: int) -> int:
    """A memory probe (it runs in the fresh process): the resident growth of a call that fills ``mib`` MiB."""
    from xclip_fast.bench.measure import rss_growth

    return rss_growth(lambda: torch.ones(mib * 2**20, dtype=torch.uint8))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resident memory is read from Linux's /proc")
def test_fresh_process_probe_reads_what_one_call_allocates():
    """The CPU memory column of every level (``fresh_rss_mib``): a call that fills 64 MiB reads as
    64 MiB, above what the process held before, and twice that for 128 (the warm-up call's pages
    are returned, not counted again)."""
    from xclip_fast.bench.measure import fresh_rss_mib

    small, large = fresh_rss_mib(_touches, 64), fresh_rss_mib(_touches, 128)
    # the call's own tensor: up to 1 MiB of it may land on pages the process already held (measured
    # 63.9 for 64), and at most a few MiB of allocator and interpreter pages come on top
    assert 64 - 1 <= small <= 64 + 8, small
    assert 128 - 1 <= large <= 128 + 8, large
    assert 1.9 <= large / small <= 2.1  # proportional to the call's bytes, not a constant
