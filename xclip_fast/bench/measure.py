"""Measuring: time (CUDA events / interleaved CPU rounds), peak memory (CUDA allocator / resident
memory of a fresh CPU process) and the device's copy bandwidth."""

from __future__ import annotations

import gc
import os
import statistics
import time

import torch

from xclip_fast.dtypes import BY_NAME, dtype_name

__all__ = ["MIB", "time_ms", "time_interleaved", "interleaved_times", "deciles", "host_times", "gpu_idle_fraction",
           "cuda_memory", "cpu_memory", "fresh_rss_mib", "rss_growth", "copy_bandwidth", "free"]

MIB = 2**20


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, quick: bool):
    """(median, p20, p80) in ms of one callable: CUDA events through ``triton.testing.do_bench`` on
    GPU, ``time.perf_counter`` over repeats after a warm-up on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    return time_interleaved({"fn": fn}, quick)["fn"]


def interleaved_times(fns: dict, rounds: int, budget: float) -> dict:
    """Call times (ms) of several callables taken in alternating rounds (A B C A B C ...), so that
    drifts of a shared machine (other load, clocks) hit every provider alike; each callable gets
    ``budget`` seconds per round (at least one call), after one warm-up call. Returns name -> list."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                if time.perf_counter() - start > budget:
                    break
    return times


def deciles(ts: list) -> list:
    """The 9 deciles of ``ts`` (p10 ... p90); one sample stands for all of them."""
    return statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9


def time_interleaved(fns: dict, quick: bool, rounds: int | None = None) -> dict:
    """CPU timing of several callables in alternating rounds (:func:`interleaved_times`). Returns
    name -> (median, p20, p80) in ms."""
    rounds = rounds or (5 if quick else 15)
    budget = (0.6 if quick else 4.0) / max(1, len(fns))  # seconds per provider per run
    out = {}
    for name, ts in interleaved_times(fns, rounds, budget / rounds).items():
        q = deciles(ts)
        out[name] = (statistics.median(ts), q[1], q[7])
    return out


def host_times(fns: dict, device, rounds: int = 30, calls: int = 10) -> dict:
    """Host time of several callables at sizes where the arithmetic is negligible: name ->
    ``(median ms per call, median ratio to the first callable)``. Rounds alternate the callables
    (``calls`` calls each, synchronised on CUDA), and each round's ratio is taken within the round,
    so a drift of a shared machine cancels. On CPU it runs on one thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for fn in fns.values():
            for _ in range(3):
                fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3 / calls)
    finally:
        torch.set_num_threads(threads)
    first = next(iter(times.values()))
    return {name: (statistics.median(ts), statistics.median(t / f for t, f in zip(ts, first)))
            for name, ts in times.items()}


def gpu_idle_fraction(fn, device) -> float | None:
    """The fraction of one call's wall time the GPU ran no kernel: 1 - (kernel time, from the
    profiler's CUDA activity) / (wall time of the call, synchronised)
    (:func:`xclip_fast.bench.gputime.kernel_table`). None off CUDA."""
    if device.type != "cuda":
        return None
    from xclip_fast.bench.gputime import kernel_table

    table = kernel_table(fn, device, calls=1)
    return max(0.0, 1.0 - table["busy_ms"] / table["wall_ms"])


def cuda_memory(fn, device):
    """(peak MiB, MiB above what was allocated before the call) of one call."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / MIB, (peak - base) / MIB


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def rss_growth(call) -> int:
    """The resident-memory growth (bytes) of one ``call()`` after a warm-up call (one-time
    allocations, kernel libraries and thread pools, are not the call's): the high-water mark over
    the resident size before it. Meant for a fresh process (Linux ``/proc``)."""
    call()
    gc.collect()
    base = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    call()
    return _proc_status("VmHWM") - base


def _rss_probe(case, dtype_str, provider, mode, quick):
    """Runs in a fresh process: the resident-memory growth of one call (bytes)."""
    from xclip_fast.bench.workloads import Workload

    torch.set_num_threads(max(1, torch.get_num_threads()))
    w = Workload(case, BY_NAME[dtype_str], torch.device("cpu"), grad=mode == "fwdbwd", quick=quick)
    fn = w.provider(provider)

    def call():
        w.run(fn, mode)
        w.clear_grads()
    return rss_growth(call)


_POOL = None


def fresh_rss_mib(probe, *args) -> float | None:
    """The bytes ``probe(*args)`` returns (a :func:`rss_growth`), in MiB, run in a fresh process
    (forkserver: torch is imported once, each measurement forks a clean child); None off Linux."""
    global _POOL
    import multiprocessing as mp

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    if _POOL is None:
        _POOL = mp.get_context("forkserver")
        _POOL.set_forkserver_preload(["torch", "xclip_fast.bench.workloads"])
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once, so resident
    # memory follows live memory (by default it keeps freed blocks after the first big free, and a
    # second call would reuse them without growing). Read by the server when it starts.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        pool = _POOL.Pool(1, maxtasksperchild=1)
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    with pool:
        return pool.apply(probe, args) / MIB


def cpu_memory(case, dtype, provider, mode, quick):
    """Peak resident-memory growth (MiB) of one call of a provider, in a fresh process."""
    return fresh_rss_mib(_rss_probe, case, dtype_name(dtype), provider, mode, quick)


def copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written)."""
    n = (512 if device.type == "cuda" else 64) * MIB
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device, quick=True)
    return 2 * n / (ms * 1e-3) / 1e9
