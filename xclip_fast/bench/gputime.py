"""Kernel time without Python in it: CUDA-graph replay, the profiler's kernel table, host time apart.

An eager call on a GPU takes the longer of two times: the time its kernels run, and the time the
host spends issuing them (Python, PyTorch's dispatch, the launches). CUDA events around eager calls
(``triton.testing.do_bench``) measure whichever is longer, and for X-CLIP's short attention
kernels that is often the host. This module measures the two apart:

- :class:`GraphTimer`: the launch sequence of a call is captured once into a CUDA graph, and the graph
  is replayed between two CUDA events: nothing but replays runs in the timed region, so the time is
  the kernels'. A graph holds enough repetitions of the call that the launch of the graph itself
  (microseconds) is spread thin, and several callables (the same call on several input sets,
  :func:`rotation`) are captured in turn, so that a call's inputs are not still in L2 from its
  last run when they are smaller than the cache.
- host time (:attr:`Timing.host_ms`): calls issued back to back, synchronised only before the
  first and after the clock is read, the clock read when the last one returns: what the host
  spends per call while the GPU works behind it.
- :func:`kernel_table`: the profiler's device activity over a few calls: each kernel's name, calls
  and time per call, and their sum (the GPU's busy time, from which an idle fraction follows).
- :class:`CPUTimer`: the same interface on a CPU (dry runs), where every call is host time.

A timer's ``measure(calls)`` returns a :class:`Timing` (its ``gpu_ms`` and ``host_ms`` are the two
halves); :func:`measure_or_profile` falls back on the profiler's kernel time where a call cannot be
captured. The tuner, the bench's attention level and the lab take the timer as an argument, so the
tests give them a fake one.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["Timing", "GraphTimer", "CPUTimer", "measure_or_profile", "kernel_table", "rotation", "quantiles"]


@dataclass
class Timing:
    """Milliseconds per call: median and p20/p80 over the timed rounds, the host's time per call,
    and how the time was taken (``"graph"``: CUDA-graph replay; ``"cpu"``: wall time on a CPU)."""

    ms: float
    p20: float
    p80: float
    host_ms: float | None
    how: str


def quantiles(ts) -> tuple[float, float, float]:
    """(median, p20, p80) of ``ts`` (:func:`~xclip_fast.bench.measure.deciles`)."""
    from xclip_fast.bench.measure import deciles

    ts = list(ts)
    q = deciles(ts)
    return statistics.median(ts), q[1], q[7]


def rotation(bytes_per_call: float, l2_bytes: int | None, most: int = 8) -> int:
    """How many input sets a timing cycles through so that one call's inputs have left L2 by its
    next run: enough to move three times the cache between two runs of the same set, at most ``most``."""
    if not l2_bytes or not bytes_per_call:
        return 1
    return max(1, min(most, math.ceil(3 * l2_bytes / bytes_per_call)))


class _Timer:
    """``measure`` = ``gpu_ms`` + ``host_ms``: what every timer shares."""

    how = ""

    def measure(self, calls) -> Timing:
        calls = list(calls)
        ms, p20, p80 = self.gpu_ms(calls)
        return Timing(ms, p20, p80, self.host_ms(calls[0]), self.how)


class GraphTimer(_Timer):
    """GPU time per call by CUDA-graph replay (see the module doc), host time apart.

    ``cuda``: the CUDA API it uses (``torch.cuda``; the tests pass a fake that records what runs
    where). ``rounds`` timed rounds of ``replays`` back-to-back replays each; a graph holds the calls
    repeated until one replay lasts about ``target_ms`` (at most ``most_repeats`` times)."""

    how = "graph"

    def __init__(self, device, *, rounds: int = 7, replays: int = 5, warmup: int = 2, target_ms: float = 0.5,
                 most_repeats: int = 64, host_calls: int = 10, cuda=None):
        self.device = torch.device(device)
        self.rounds, self.replays, self.warmup = rounds, replays, warmup
        self.target_ms, self.most_repeats, self.host_calls = target_ms, most_repeats, host_calls
        self.cuda = cuda if cuda is not None else torch.cuda

    def _capture(self, calls, repeats: int):
        cuda = self.cuda
        graph = cuda.CUDAGraph()
        with cuda.graph(graph):
            for _ in range(repeats):
                for fn in calls:
                    fn()
        graph.replay()  # the first replay uploads the graph
        cuda.synchronize(self.device)
        return graph

    def _replays_ms(self, graph, replays: int) -> float:
        """Milliseconds of ``replays`` back-to-back replays: only replays between the two events."""
        cuda = self.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def gpu_ms(self, calls) -> tuple[float, float, float]:
        """(median, p20, p80) GPU milliseconds per call of ``calls`` (callables, each one call)."""
        cuda, calls = self.cuda, list(calls)
        # warm up on a side stream (compilation, autotuning, allocations), as graph capture wants
        side = cuda.Stream(self.device)
        side.wait_stream(cuda.current_stream(self.device))
        with cuda.stream(side):
            for _ in range(self.warmup):
                for fn in calls:
                    fn()
        cuda.current_stream(self.device).wait_stream(side)
        cuda.synchronize(self.device)
        repeats = 1
        graph = self._capture(calls, repeats)
        once = self._replays_ms(graph, 3) / 3
        if 0 < once < self.target_ms and self.most_repeats > 1:  # spread the graph launch over more calls
            repeats = min(self.most_repeats, math.ceil(self.target_ms / once))
            del graph
            graph = self._capture(calls, repeats)
        per_call = self.replays * repeats * len(calls)
        times = [self._replays_ms(graph, self.replays) / per_call for _ in range(self.rounds)]
        del graph
        return quantiles(times)

    def host_ms(self, fn) -> float:
        """The host's milliseconds per call of ``fn`` (median of three bursts of ``host_calls``)."""
        cuda = self.cuda
        fn()
        times = []
        for _ in range(3):
            cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for _ in range(self.host_calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / self.host_calls)
        cuda.synchronize(self.device)
        return statistics.median(times)


class CPUTimer(_Timer):
    """:class:`GraphTimer`'s interface on a CPU: wall time per call, all of it host time."""

    how = "cpu"

    def __init__(self, rounds: int = 5):
        self.rounds = rounds

    def gpu_ms(self, calls) -> tuple[float, float, float]:
        """(median, p20, p80) wall milliseconds per call of ``calls`` (after one warm-up round)."""
        calls = list(calls)
        times = []
        for _ in range(self.rounds + 1):
            t0 = time.perf_counter()
            for fn in calls:
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / len(calls))
        return quantiles(times[1:])

    def host_ms(self, fn) -> float:
        return self.gpu_ms([fn])[0]


def measure_or_profile(timer, calls, device) -> Timing:
    """``timer.measure(calls)``; where the calls cannot be captured into a graph, the profiler's
    kernel time per call instead (still GPU time without the host's share; no host time), with
    the reason in ``how``."""
    calls = list(calls)
    try:
        return timer.measure(calls)
    except Exception as exc:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        busy = kernel_table(calls[0], device)["busy_ms"]
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        return Timing(busy, busy, busy, None, f"profiler (graph capture failed: {why})")


def kernel_table(fn, device, calls: int = 3) -> dict:
    """What the device runs per call of ``fn``, from the profiler: ``{"busy_ms": ..., "wall_ms": ...,
    "kernels": [{"name", "calls", "us"}, ...]}`` (per call, longest first; ``wall_ms``: the profiled
    calls' synchronised wall time, the profiler's own overhead included). On CUDA the device
    activity: kernels, memory copies and sets; on a CPU, which is then the device, each operator's
    self time. Overlapping kernels (several streams) would count twice."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    totals: dict[str, list] = {}
    for event in prof.events():
        on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
        if cuda != on_device:
            continue
        if cuda:
            us = event.time_range.elapsed_us()
        else:
            if event.is_async or event.name.startswith(("ProfilerStep", "[")):
                continue
            us = event.self_cpu_time_total
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    kernels = sorted(({"name": name, "calls": n / calls, "us": us / calls} for name, (n, us) in totals.items()),
                     key=lambda k: -k["us"])
    return {"busy_ms": sum(k["us"] for k in kernels) / 1e3, "wall_ms": wall_ms, "kernels": kernels}
