"""``backend="auto"`` on CUDA runs our kernels only on evidence (xclip_fast/autochoice.py).

Without a GPU the choice is tested with a CPU stood in for an sm_90 GPU (``auto`` then decides for CPU
tensors as it would on CUDA, and our kernels run in Triton's interpreter), a fake timer and a fake table:
no evidence -> SDPA; a table row -> what it says; a corrupt or foreign cache -> ignored with one warning;
a cache of other versions -> not used; while traced -> the table only; two gloo ranks whose timers
disagree -> rank 0's choice on both. Which kernels ran is read from the launches, not assumed.
"""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from _autochoice_worker import IDENTITY, FakeTimer, attend, inputs, one_call, stand_in_gpu
from _helpers import needs_triton, spawn_results
from test_gputime import record_launches

from xclip_fast import autochoice
from xclip_fast.autochoice import Call, Key
from xclip_fast.ops import attention_call

pytestmark = needs_triton
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_gpu(tmp_path):
    """An sm_90 stand-in with an empty table and a cache folder of its own; everything restored after."""
    saved = {name: getattr(autochoice, name) for name in ("arch_of", "identity", "_TABLE", "_warned")}
    env = {k: os.environ.get(k) for k in (autochoice.CACHE_ENV, autochoice.MEASURE_ENV)}
    autochoice._warned = set()
    stand_in_gpu(str(tmp_path / "cache"))
    yield tmp_path
    for name, value in saved.items():
        setattr(autochoice, name, value)
    for k, v in env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    autochoice.forget()


def _key(device, training=False, compiled=False) -> Key:
    qkv = torch.zeros(3, 5, 3, 2, 16, device=device)
    return autochoice.key_for(qkv.device, torch.float32, 16, attention_call(qkv, qkv[:, :2, 0], training), compiled)


def _row(key: Key, backend: str, ratio: float) -> dict:
    return dict(key._asdict(), backend=backend, ratio=ratio, against="SDPA", what="a fake row", device="Fake GPU",
                commit="0000000", date="2026-12-06")


def _ran_ours(fn) -> bool:
    with record_launches() as log:
        fn()
    return any(name in ("_sequence_fwd_kernel", "_packed_fwd_kernel") for _, name in log)


def _write_cache(path: str, entries) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"producer": "xclip_fast", "format": 1, "entries": entries}, f)


def _entry(key: Key, backend: str, identity=None) -> dict:
    return {"identity": identity or dict(IDENTITY), "key": key._asdict(), "backend": backend,
            "ms": {"triton": 1.0, "torch": 2.0}, "agrees": True, "date": "2026-12-06"}


# ------------------------------------------------------------------------------------------------
# the evidence
# ------------------------------------------------------------------------------------------------
def test_without_evidence_auto_runs_sdpa(fake_gpu, device):
    assert not _ran_ours(lambda: one_call(device))
    decision = autochoice.describe(device, torch.float32, 16, Call(3, 5, 5, 2, True, False))
    assert decision.backend == "torch" and decision.source == "none" and "xclip_fast.tune()" in decision.reason


def test_a_table_row_decides_its_key_only(fake_gpu, device):
    autochoice._TABLE = {_key(device): _row(_key(device), "triton", 1.5)}
    autochoice.forget()
    assert _ran_ours(lambda: one_call(device))  # the forward key has a row
    with torch.enable_grad():  # the training key has none
        qkv = torch.randn(3, 5, 3, 2, 16, device=device, requires_grad=True)
        assert not _ran_ours(lambda: attend(qkv, torch.randn(3, 2, 2, 16, device=device)))
    assert "1.50x SDPA on Fake GPU" in autochoice.describe(device, torch.float32, 16, Call(3, 5, 5, 2, True,
                                                                                           False)).reason


def test_the_users_measurement_is_made_once_cached_and_beats_the_table(fake_gpu, device, monkeypatch):
    autochoice._TABLE = {_key(device): _row(_key(device), "torch", 0.5)}
    timer = FakeTimer({"triton": 1.0, "torch": 2.0})
    monkeypatch.setattr(autochoice, "_default_timer", lambda device: timer)
    monkeypatch.setenv(autochoice.MEASURE_ENV, "1")
    autochoice.forget()
    assert _ran_ours(lambda: one_call(device))
    assert sorted(timer.calls) == ["torch", "triton"]
    assert _ran_ours(lambda: one_call(device)) and len(timer.calls) == 2  # decided once
    entries = json.load(open(autochoice.cache_path()))["entries"]
    assert [e["backend"] for e in entries] == ["triton"] and entries[0]["identity"] == IDENTITY
    autochoice.forget()  # a new process: the cache answers, nothing is timed again
    assert _ran_ours(lambda: one_call(device)) and len(timer.calls) == 2
    assert autochoice.describe(device, torch.float32, 16, Call(3, 5, 5, 2, True, False)).source == "measured"


def test_a_measurement_never_chooses_a_slower_or_disagreeing_kernel(fake_gpu, device, monkeypatch):
    call = Call(3, 5, 5, 2, True, False)
    within_noise = FakeTimer({"triton": 1.0, "torch": 1.0 * autochoice.MARGIN * 0.99})
    assert autochoice.measure(call, torch.float32, 16, device, within_noise)["backend"] == "torch"
    faster = FakeTimer({"triton": 1.0, "torch": 2.0})
    entry = autochoice.measure(call, torch.float32, 16, device, faster)
    assert entry["backend"] == "triton" and entry["agrees"]
    real = autochoice._candidate

    def wrong(call, backend, tensors, grad):  # our output made wrong by 10%
        run = real(call, backend, tensors, grad)
        if backend != "triton":
            return run
        bad = lambda: run() * 1.1  # noqa: E731
        bad.backend = "triton"
        return bad
    monkeypatch.setattr(autochoice, "_candidate", wrong)
    entry = autochoice.measure(call, torch.float32, 16, device, faster)
    assert entry["backend"] == "torch" and not entry["agrees"]


def test_a_failed_measurement_runs_sdpa_and_is_not_cached(fake_gpu, device, monkeypatch):
    def broken(call, backend, tensors, grad):
        def run():
            raise RuntimeError("out of resources: shared memory")
        run.backend = backend
        return run
    monkeypatch.setattr(autochoice, "_candidate", broken)
    monkeypatch.setattr(autochoice, "_default_timer", lambda device: FakeTimer({"triton": 1.0, "torch": 2.0}))
    monkeypatch.setenv(autochoice.MEASURE_ENV, "1")
    assert not _ran_ours(lambda: one_call(device))  # the user's call itself runs, on SDPA
    decision = autochoice.describe(device, torch.float32, 16, Call(3, 5, 5, 2, True, False))
    assert decision.backend == "torch" and "out of resources" in decision.reason
    assert not os.path.exists(autochoice.cache_path())


def test_a_cache_that_cannot_be_written_is_said_once_and_the_choice_still_applies(fake_gpu, device, monkeypatch):
    blocker = fake_gpu / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(autochoice.CACHE_ENV, str(blocker / "cache"))  # a folder inside a file
    monkeypatch.setattr(autochoice, "_default_timer", lambda device: FakeTimer({"triton": 1.0, "torch": 2.0}))
    monkeypatch.setenv(autochoice.MEASURE_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ran_ours(lambda: one_call(device))
        autochoice.tune(lambda: one_call(device), timer=FakeTimer({"triton": 1.0, "torch": 2.0}))
    said = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert len(said) == 1, said


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "entries": []}),
                                     json.dumps({"producer": "xclip_fast", "format": 7, "entries": []}),
                                     json.dumps({"producer": "xclip_fast", "format": 1, "entries": [{"key": 3}]}),
                                     "no-ms"],
                         ids=["corrupt", "foreign", "other-format", "bad-entry", "entry-without-times"])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning(fake_gpu, device, content):
    os.makedirs(os.path.dirname(autochoice.cache_path()), exist_ok=True)
    if content == "no-ms":  # a valid entry for this very key, its times removed by hand
        entry = _entry(_key(device), "triton")
        del entry["ms"]
        content = json.dumps({"producer": "xclip_fast", "format": 1, "entries": [entry]})
    Path(autochoice.cache_path()).write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _ran_ours(lambda: one_call(device))
        with torch.enable_grad():  # a second key decided: no second warning
            qkv = torch.randn(3, 5, 3, 2, 16, device=device, requires_grad=True)
            assert not _ran_ours(lambda: attend(qkv, torch.randn(3, 2, 2, 16, device=device)))
    said = [str(w.message) for w in caught if "auto-choice cache" in str(w.message)]
    assert len(said) == 1 and autochoice.cache_path() in said[0], said


@pytest.mark.parametrize("field", ["torch", "triton", "driver", "gpu"])
def test_a_measurement_by_other_versions_is_not_used(fake_gpu, device, field):
    other = dict(IDENTITY, **{field: "something else"})
    _write_cache(autochoice.cache_path(), [_entry(_key(device), "triton", other)])
    assert not _ran_ours(lambda: one_call(device))
    _write_cache(autochoice.cache_path(), [_entry(_key(device), "triton")])  # the same entry, this identity
    autochoice.forget()
    assert _ran_ours(lambda: one_call(device))


def test_while_traced_only_the_table_applies(fake_gpu, device, monkeypatch):
    """The cache (eager and compiled keys alike) and the measurement are not used by a compiled graph."""
    _write_cache(autochoice.cache_path(), [_entry(_key(device), "triton"), _entry(_key(device, compiled=True),
                                                                                  "triton")])
    timer = FakeTimer({"triton": 1.0, "torch": 2.0})
    monkeypatch.setattr(autochoice, "_default_timer", lambda device: timer)
    monkeypatch.setenv(autochoice.MEASURE_ENV, "1")
    args = inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert not _ran_ours(lambda: compiled(*args)) and timer.calls == []
    assert _ran_ours(lambda: one_call(device))  # eager: the cache
    autochoice._TABLE = {_key(device, compiled=True): _row(_key(device, compiled=True), "triton", 1.2)}
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert _ran_ours(lambda: compiled(*args)) and timer.calls == []
    torch._dynamo.reset()


def test_tune_records_the_calls_measures_each_key_and_saves(fake_gpu, device):
    timer = FakeTimer({"triton": 1.0, "torch": 3.0})
    decisions = autochoice.tune(lambda: one_call(device), timer=timer)
    assert list(decisions) == [_key(device)] and decisions[_key(device)].backend == "triton"
    assert sorted(timer.calls) == ["torch", "triton"]
    assert _ran_ours(lambda: one_call(device))
    assert json.load(open(autochoice.cache_path()))["entries"][0]["key"] == _key(device)._asdict()
    with pytest.raises(RuntimeError, match="outside torch.compile"):
        torch.compile(lambda: autochoice.tune(timer=timer), backend="eager", fullgraph=True)()


def test_two_ranks_whose_timers_disagree_take_rank_0s_choice(fake_gpu, tmp_path_factory, tmp_path):
    from _autochoice_worker import worker

    ms = {0: {"triton": 1.0, "torch": 2.0}, 1: {"triton": 2.0, "torch": 1.0}}
    # alone, rank 1's timer would choose SDPA: the agreement below is not a coincidence
    assert autochoice.measure(Call(3, 5, 5, 2, True, False), torch.float32, 16, "cpu", FakeTimer(ms[1])
                              )["backend"] == "torch"
    results = spawn_results(worker, 2, tmp_path_factory, "autochoice", str(tmp_path), ms)
    assert [r["chosen"] for r in results] == ["triton", "triton"]
    assert [r["source"] for r in results] == ["measured", "agreed"]
    assert sorted(results[0]["timed"]) == ["torch", "triton"] and results[1]["timed"] == []  # rank 0 measures
    assert [r["cache"] for r in results] == [True, False]


# ------------------------------------------------------------------------------------------------
# the committed table and what prints it
# ------------------------------------------------------------------------------------------------
def test_the_committed_table_holds_the_h200_runs_rows_and_no_more():
    """Every row's ratio is recomputed from the run's own results file; the backend follows the ratio."""
    import csv

    results = ROOT / "benchmarks" / "results" / "h200-2026-12-04" / "bench" / "results.csv"
    with open(results) as f:
        runs = list(csv.DictReader(f))

    def ms(provider, mode, stamp):
        return [float(r["median_ms"]) for r in runs if r["provider"] == provider and r["mode"] == mode
                and r["timestamp"].startswith(stamp)][0]

    first, second = "2026-12-04T11:55", "2026-12-04T11:57"
    expected = {(False, False): ms("reference", "fwd", first) / ms("xclip-fast-triton", "fwd", first),
                (True, False): ms("reference", "fwdbwd", first) / ms("xclip-fast-triton", "fwdbwd", first),
                (True, True): (ms("reference-compiled", "fwdbwd", second)
                               / ms("xclip-fast-triton-compiled", "fwdbwd", second))}
    table = autochoice.load_table(autochoice.TABLE_PATH)
    assert len(table) == 6  # (frame, message attention) x the three measured modes
    for key, row in table.items():
        assert (key.arch, key.dtype, key.head_dim) == (90, "bfloat16", 64)
        assert (key.seq, key.rows) in {(256, 1024), (16, 256)}  # l + 1 = 198 keys, 768; T = 8 keys, 96
        assert row["ratio"] == pytest.approx(expected[(key.training, key.compiled)], abs=1e-3)
        assert row["backend"] == ("triton" if row["ratio"] >= autochoice.MARGIN else "torch")
        assert (row["device"], row["commit"], row["date"]) == ("NVIDIA H200", "583e708", "2026-12-04")


def test_check_prints_what_auto_chose_and_why(capsys):
    from xclip_fast.cli import main

    assert main(["check", "--backends", "torch", "--dtype", "float32", "--tokens", "5", "--width", "32",
                 "--frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "backend='auto' on this machine" in out
    if not torch.cuda.is_available():
        assert "torch for both attentions" in out and "auto runs the kernels on CUDA only" in out


def test_check_prints_a_table_row(fake_gpu, capsys):
    from xclip_fast.cli import auto_lines

    key = autochoice.key_for(torch.device("cpu"), torch.float32, 16, Call(4, 40, 40, 2, True, False), False)
    autochoice._TABLE = {key: _row(key, "triton", 1.25)}
    lines = "\n".join(auto_lines(torch.device("cpu"), torch.float32, 40, 2, 2, 32, 2))
    assert "frame attention   forward, eager     -> triton (table: ours ran at 1.25x SDPA" in lines
    assert "message attention forward, eager     -> torch  (none: no measurement" in lines


def test_the_lab_converter_makes_rows_from_kernel_timings(tmp_path):
    """benchmarks/auto_table.py: eager = the larger of GPU and host time, compiled = GPU time, against
    the fastest SDPA backend; a dry run gives no rows; --write keeps other keys' rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("auto_table", ROOT / "benchmarks" / "auto_table.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)

    def k(provider, direction, gpu, host):
        return dict(dtype="bfloat16", l=197, N=768, provider=provider, direction=direction, status="ok",
                    gpu_ms=gpu, host_ms=host)
    lab = {"environment": {"arch": 90, "device": "NVIDIA H100", "commit": "abc1234",
                           "timestamp": "2026-12-07T10:00:00+00:00"},
           "dry_run": False, "sizes": {"head_dim": 64},
           "kernels": [k("ours", "fwd", 0.10, 0.30), k("ours", "bwd", 0.30, 0.50),
                       k("sdpa-flash", "fwd", 0.20, 0.05), k("sdpa-flash", "bwd", 0.40, 0.10),
                       k("sdpa-cudnn", "fwd", 0.15, 0.05), k("sdpa-cudnn", "bwd", 0.60, 0.10),
                       k("sdpa-flash-alone", "fwd", 0.01, 0.01), k("sdpa-flash-alone", "bwd", 0.01, 0.01)]}
    rows = {(r["training"], r["compiled"]): r for r in conv.rows_from_lab(lab)}
    assert rows[(False, True)]["ratio"] == pytest.approx(0.15 / 0.10, abs=1e-3)  # cudnn fwd is fastest
    assert rows[(False, False)]["ratio"] == pytest.approx(0.15 / 0.30, abs=1e-3)  # ours is host-bound eager
    assert rows[(True, True)]["ratio"] == pytest.approx(0.60 / 0.40, abs=1e-3)  # flash fwd+bwd is fastest
    assert rows[(True, False)]["ratio"] == pytest.approx(0.60 / 0.50, abs=1e-3)
    assert [rows[m]["backend"] for m in sorted(rows)] == ["torch", "triton", "triton", "triton"]
    assert {(r["seq"], r["rows"], r["arch"], r["date"]) for r in rows.values()} == {(256, 1024, 90, "2026-12-07")}
    assert conv.rows_from_lab(dict(lab, dry_run=True)) == []
    other = _row(Key(90, "bfloat16", 64, 64, 1024, False, False), "torch", 0.9)
    same = dict(rows[(False, False)], backend="triton", ratio=9.0)
    merged = conv.merge({"format": 1, "rows": [other, same]}, list(rows.values()))
    assert len(merged["rows"]) == 5 and other in merged["rows"] and same not in merged["rows"]


def test_a_block_with_auto_compiles_in_one_graph(device):
    """On this machine's device, unpatched (on a GPU: the architecture is read once as a constant while
    traced, the table looked up in the graph's trace): one graph, the eager result."""
    from xclip_fast.blocks import CrossFrameAttentionBlock

    block = CrossFrameAttentionBlock(32, 2, T=2).to(device)
    x = torch.randn(5, 4, 32, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.no_grad():  # (fp32, the same operations traced: only their rounding may differ)
        assert torch.allclose(compiled(x), block(x), atol=1e-5)
    x.requires_grad_()
    compiled(x).sum().backward()
    torch._dynamo.reset()
