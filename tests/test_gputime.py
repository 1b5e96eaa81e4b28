"""Kernel time without Python in it (xclip_fast/bench/gputime.py), and each kernel timed apart.

On a CPU there is no CUDA graph to replay, so the timer runs here on a fake CUDA API that logs what
happens where: the timed regions (between two events) hold graph replays and nothing else, and the
launches happen while warming up and capturing. The tuner and the bench's kernel rows are run with a
fake timer that records which kernels each timed callable launches (through the launchers'
``wrap_triton``, under the interpreter): each row's launches are one kernel, its own, and no launch
sequence is reported under two names. On the first GPU run the tuner timed the whole backward on both
its dk/dv and its dq rows, and through Python on every call.
"""

import contextlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from xclip_fast.bench.cases import Case
from xclip_fast.bench.gputime import GraphTimer, Timing, kernel_table, rotation
from xclip_fast.bench.kernels import ATTENTION_KERNELS, KERNEL_NAMES, AttentionProblem, QuickGELUProblem, kernel_rows

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def record_launches(log=None):
    """Every kernel launch through the launchers of xclip_fast.kernels, by the name it compiles to."""
    from xclip_fast.kernels import attention as A
    from xclip_fast.kernels import quick_gelu as Q

    log = [] if log is None else log

    def recording(wrap):
        def wrapped(kernel):
            launcher = wrap(kernel)

            class Grid:
                def __getitem__(self, grid):
                    run = launcher[grid]

                    def call(*args, **kwargs):
                        log.append(("launch", A.launch_name(kernel, kwargs)))
                        return run(*args, **kwargs)
                    return call
            return Grid()
        return wrapped

    saved = A.wrap_triton, Q.wrap_triton
    A.wrap_triton, Q.wrap_triton = recording(saved[0]), recording(saved[1])
    try:
        yield log
    finally:
        A.wrap_triton, Q.wrap_triton = saved


class RecordingTimer:
    """A fake timer: runs the calls once, records the kernels they launch, and returns a time of its
    own for each measurement (the n-th measures n ms), so a row's time names its launch sequence."""

    how = "fake"

    def __init__(self):
        self.sequences = []

    def measure(self, calls):
        with record_launches() as log:
            for fn in calls:
                fn()
        self.sequences.append(tuple(name for _, name in log))
        ms = float(len(self.sequences))
        return Timing(ms, ms, ms, 0.0, self.how)

    def sequence(self, ms) -> tuple:
        return self.sequences[int(round(float(ms))) - 1]


class FakeCuda:
    """``torch.cuda`` as GraphTimer uses it, logging synchronisations, captures, replays and events;
    each timed region lasts ``elapsed`` ms."""

    def __init__(self, log, elapsed=1.0):
        self.log, self.elapsed = log, elapsed

    class _Stream:
        def wait_stream(self, other):
            pass

    def Stream(self, device):  # noqa: N802 (torch.cuda's names)
        return self._Stream()

    def current_stream(self, device):
        return self._Stream()

    def stream(self, s):
        return contextlib.nullcontext()

    def synchronize(self, device=None):
        self.log.append(("sync",))

    def CUDAGraph(self):  # noqa: N802
        log = self.log

        class Graph:
            def replay(self):
                log.append(("replay",))
        return Graph()

    @contextlib.contextmanager
    def graph(self, g):
        self.log.append(("capture",))
        yield
        self.log.append(("captured",))

    def Event(self, enable_timing):  # noqa: N802
        fake = self

        class Event:
            def record(self):
                fake.log.append(("event",))

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return fake.elapsed
        return Event()


def _timed_regions(log):
    """The entries between each pair of events (start, end) of ``log``."""
    regions, current = [], None
    for entry in log:
        if entry == ("event",):
            if current is None:
                current = []
            else:
                regions.append(current)
                current = None
        elif current is not None:
            current.append(entry)
    assert current is None, "an event without its pair"
    return regions


@pytest.mark.triton
def test_graph_timer_keeps_python_out_of_the_timed_region():
    problem = AttentionProblem(8, 5, 1, 16, torch.float32, torch.device("cpu"), extra=True)  # 8 x 1: not split
    problem.prepare()
    log = []
    timer = GraphTimer("cpu", rounds=4, replays=3, warmup=1, target_ms=0.5, host_calls=2, cuda=FakeCuda(log))
    with record_launches(log):
        t = timer.measure([lambda: problem.launch("bwd")])
    regions = _timed_regions(log)
    assert len(regions) == 1 + 4  # the calibration, then the rounds
    assert all(region and set(region) == {("replay",)} for region in regions), regions
    assert [len(r) for r in regions] == [3, 3, 3, 3, 3]
    # every launch happened outside the timed regions: warm-up, the two captures (one replay of the
    # first took 1/3 ms < 0.5: the second holds the call twice), the host-time bursts
    launches = [e for e in log if e[0] == "launch"]
    assert set(launches) == {("launch", "_sequence_bwd_kernel")}
    captures = [i for i, e in enumerate(log) if e == ("capture",)]
    assert len(captures) == 2
    second = log[captures[1]:log.index(("captured",), captures[1])]
    assert second.count(("launch", "_sequence_bwd_kernel")) == 2
    # 1 ms per region of 3 replays of a graph holding the call twice
    assert t.ms == pytest.approx(1 / 6) and t.how == "graph" and t.host_ms >= 0


def _tune_module():
    spec = importlib.util.spec_from_file_location("tune", ROOT / "benchmarks" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _own_launches(kernel, launched):
    """What a row of ``kernel`` may launch: its own kernel, and for the sequence backward the sum of split
    key chunks' dq when the grid is small."""
    own = {KERNEL_NAMES[kernel]}
    if kernel == "bwd" and "_sequence_dq_sum_kernel" in launched:
        own.add("_sequence_dq_sum_kernel")
    return own


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU interpreter's")
def test_tuner_times_each_kernel_alone_under_its_own_name(tmp_path, capsys):
    import csv

    timer = RecordingTimer()
    assert _tune_module().tune(tmp_path, budget=600, dry_run=True, timer=timer) == 0
    with open(tmp_path / "tune.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["ms"]]
    assert {r["kernel"] for r in rows} == {*ATTENTION_KERNELS, "quick_gelu_fwd", "quick_gelu_bwd"}
    names = {}
    for r in rows:
        launched = set(timer.sequence(r["ms"]))
        assert launched == _own_launches(r["kernel"], launched), (r, launched)  # one kernel, its own
        names.setdefault(launched.pop(), set()).add(r["kernel"])
    assert all(len(kernels) == 1 for kernels in names.values()), names  # no sequence under two names
    assert {r["timing"] for r in rows} == {"fake"} and all(r["host_ms"] for r in rows)
    out = capsys.readouterr().out
    assert "GPU ms" in out and "host ms" in out


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["frames", "messages"])
def test_bench_kernel_rows_time_each_kernel_alone(kind):
    case = (Case("attention", "frames", "b32", 1, 2, 5, 32, 2) if kind == "frames"
            else Case("attention", "messages", "b32", 2, 7, 0, 32, 2))
    env = dict(timestamp="t", commit="c", device="cpu", torch="x", triton="y", xformers="z")
    timer = RecordingTimer()
    rows = kernel_rows(case, torch.float32, "fwdbwd", torch.device("cpu"), env, timer, copy_bw=None)
    # the frame attention runs the sequence kernels; the message attention at T = 7 packs its sequences
    kernels = ("fwd", "bwd") if kind == "frames" else ("packed_fwd", "packed_delta", "packed_dkdv", "packed_dq")
    assert [r.provider for r in rows] == [f"xclip-fast-triton/{k}" for k in kernels]
    for kernel, r in zip(kernels, rows):
        launched = timer.sequence(r.median_ms)
        assert set(launched) == _own_launches(kernel, launched) and launched[0] == KERNEL_NAMES[kernel]
        assert r.extras["kernel"] == KERNEL_NAMES[kernel] and r.extras["host_ms"] == 0.0
        assert r.gbps and (r.tflops is None) == (kernel == "packed_delta")
    fwd_only = kernel_rows(case, torch.float32, "fwd", torch.device("cpu"), env, RecordingTimer(), copy_bw=None)
    assert [r.provider for r in fwd_only] == [f"xclip-fast-triton/{kernels[0]}"]


@pytest.mark.triton
def test_packed_backward_passes_launched_alone_give_the_whole_backward():
    """The tuner and the lab launch the packed delta, dk/dv and dq passes one at a time: the same
    results, bit for bit, as the one backward call (which autograd runs)."""
    from xclip_fast.kernels import attention as A

    p = AttentionProblem(5, 7, 2, 16, torch.float32, torch.device("cpu"), extra=False)
    assert p.kernels() == ("packed_fwd", "packed_delta", "packed_dkdv", "packed_dq")
    p.launch("packed_fwd")
    whole = [torch.empty_like(g) if g is not None else None for g in p.grads]
    A.attention_bwd(p.q, p.k, p.v, p.ek, p.ev, p.o, p.lse, p.do, *whole, p.scale)
    for kernel in ("packed_delta", "packed_dkdv", "packed_dq"):
        p.launch(kernel)
    for name, a, b in zip(("dq", "dk", "dv"), p.grads, whole):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match="read delta"):
        A.attention_bwd(p.q, p.k, p.v, p.ek, p.ev, p.o, p.lse, p.do, *whole, p.scale, passes=("dq",))
    with pytest.raises(AssertionError, match="not a kernel of this problem"):
        p.launch("bwd")


def test_quick_gelu_problem_counts_its_bytes():
    p = QuickGELUProblem(1000, torch.float32, torch.device("cpu"))
    assert p.bytes("quick_gelu_fwd") == 8000 and p.bytes("quick_gelu_bwd") == 12000


def test_attention_problem_counts_the_floor_of_the_issue():
    """l = 197 with the message token, 3072 sequences of head dim 64, bf16: the forward must move
    >= 310 MB (q, k, v read, o written) and the backward >= 620 MB (q, k, v, o, dO read; dq, dk, dv
    written), which the one-launch backward moves once; computed on meta tensors."""
    p = AttentionProblem(3072, 197, 1, 64, torch.bfloat16, torch.device("meta"), extra=True)
    tok = 3072 * 197 * 64 * 2
    assert 4 * tok <= p.bytes("fwd") <= 4.05 * tok
    assert 8 * tok <= p.bytes("bwd") <= 8.1 * tok  # + lse and the extra token
    assert p.flops("fwd") == 2 * 2.0 * 3072 * 197 * 198 * 64
    assert p.flops("bwd") == 2.5 * p.flops("fwd")  # five products, P computed once
    assert p.flops("packed_dkdv") + p.flops("packed_dq") == 3.5 * p.flops("fwd") and p.flops("packed_delta") is None


def test_rotation_moves_three_caches_between_two_runs_of_an_input_set():
    assert rotation(10e6, 50_000_000) == 8  # capped
    assert rotation(40e6, 50_000_000) == 4
    assert rotation(400e6, 50_000_000) == 1
    assert rotation(1e6, None) == 1


def test_kernel_table_on_a_cpu_lists_the_operators_of_a_call():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    table = kernel_table(lambda: (a @ b).relu(), "cpu", calls=2)
    names = {k["name"]: k for k in table["kernels"]}
    assert "aten::mm" in names and names["aten::mm"]["calls"] == 1
    assert math.isclose(table["busy_ms"], sum(k["us"] for k in table["kernels"]) / 1e3)
    assert 0 < table["busy_ms"] <= table["wall_ms"]  # the operators ran inside the profiled wall time


def test_bench_attention_level_times_by_graph_replay_and_says_when_it_could_not():
    from xclip_fast.bench import run
    from xclip_fast.bench.results import Result, table

    case = Case("attention", "frames", "b32", 1, 2, 5, 32, 2)
    env = dict(timestamp="t", commit="c", device="cpu", torch="x", triton="y", xformers="z")

    class Replayed:
        def measure(self, calls):
            return Timing(0.5, 0.4, 0.6, 0.125, "graph")

    class Uncapturable:
        def measure(self, calls):
            raise RuntimeError("operation not permitted when stream is capturing")

    row = Result.make(env, case, "float32", "fwd", "sdpa-flash")
    run._time_by_graph(row, lambda: None, torch.device("cpu"), Replayed())
    assert (row.median_ms, row.p20_ms, row.p80_ms) == (0.5, 0.4, 0.6)
    assert row.extras == {"host_ms": 0.125, "timing": "graph"}
    text = table([row], env)
    assert "host ms" in text and "0.125" in text and "no Python in it" in text
    # a call that cannot be captured: the profiler's kernel time (here the CPU operators'), no host time
    a = torch.randn(64, 64)
    fallback = Result.make(env, case, "float32", "fwd", "sdpa-flash")
    run._time_by_graph(fallback, lambda: a @ a, torch.device("cpu"), Uncapturable())
    assert fallback.median_ms > 0 and fallback.extras["host_ms"] is None
    assert fallback.extras["timing"].startswith("profiler (graph capture failed: RuntimeError: operation not")
