"""Speed and peak memory of xclip-fast against the original model, torch.compile, SDPA and xformers.

The runner behind ``xclip-fast bench`` and the pytest-benchmark suite in ``benchmarks/`` (it lives
in the package so that the installed command can import it). Every figure is measured in one
process, on one device, on the same inputs, and reported as a ratio against ``reference``.

Levels:
- ``attention``: frame attention with the message token (original: concatenate the message token
  to the frame tokens, attend over l+1 tokens, slice l back out) and the cross-frame message
  attention over T tokens per video.
- ``block``: one ``CrossFramelAttentionBlock`` (official) against the fast block.
- ``encoder``: the whole video encoder, inference, including the chunked mode for long clips.

Each provider's result is checked against a high-precision run (float64 on CPU, float32 without
TF32 on CUDA) before it is timed; the tolerance is the larger of the dtype's tolerance and twice the
error of the reference provider itself in the same dtype. A provider that cannot run is listed as
skipped with its reason.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xclip_fast import reference
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.encoder import PRESETS, XCLIPVideoEncoder
from xclip_fast.ops import attention as fast_attention
from xclip_fast.ops import triton_status
from xclip_fast.testing import TOLERANCES, rel_err

LEVELS = ("attention", "block", "encoder")
MODES = ("fwd", "fwdbwd")
SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-math": "MATH"}
PROVIDERS = {
    # attention level: the baselines are the SDPA backends and xformers (torch.compile of one SDPA call
    # has nothing to fuse); torch.compile is measured where it can fuse, on the whole block
    "attention": ["reference", *SDPA, "xformers", "xclip-fast-torch", "xclip-fast-triton"],
    "block": ["reference", "reference-compiled", *SDPA, "xformers", "xclip-fast-torch", "xclip-fast-triton"],
    "encoder": ["reference", "xclip-fast-torch", "xclip-fast-triton", "xclip-fast-torch-chunked",
                "xclip-fast-triton-chunked"],
}
ALL_PROVIDERS = sorted({p for ps in PROVIDERS.values() for p in ps})
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MIB = 2**20
CSV_FIELDS = [
    "timestamp", "commit", "device", "torch", "triton", "xformers", "level", "case", "model", "dtype", "mode",
    "batch", "frames", "tokens", "provider", "status", "reason", "median_ms", "p20_ms", "p80_ms", "speedup",
    "peak_mib", "extra_mib", "memory_ratio", "tflops", "gbps", "bandwidth_fraction", "error", "tolerance",
    "checked_against",
]


class Skip(Exception):
    """A provider that cannot run here; the message is the reason shown in the table."""


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One problem size. ``kind``: ``frames`` / ``messages`` (attention), ``block``, ``encoder``."""

    level: str
    kind: str
    model: str
    batch: int  # videos b
    frames: int  # T
    tokens: int  # l (0 for message attention)
    width: int
    heads: int
    chunk_frames: int = 0

    @property
    def label(self) -> str:
        if self.kind == "frames":
            return f"frame attn {self.model} l={self.tokens} N={self.batch * self.frames}"
        if self.kind == "messages":
            return f"message attn T={self.frames} b={self.batch}"
        return f"{self.kind} {self.model} b={self.batch} T={self.frames}"


def _model_dims(model: str) -> tuple[int, int, int]:
    p = PRESETS[model]
    return p["width"], p["heads"], (p["input_resolution"] // p["patch_size"]) ** 2 + 1


def default_frames(level: str, quick: bool, cuda: bool) -> list[int]:
    """T values of the block and encoder levels when ``--frames`` is not given: the released 8, 16,
    32 plus long clips (block, on GPU 64 ... 512), 8 ... 1024 for the encoder on GPU."""
    if quick:
        return [8]
    if level == "block":
        return [8, 16, 32, 64, 128, 256, 512] if cuda else [8, 32]
    return [8, 32, 128, 512, 1024] if cuda else [8, 32]


def build_cases(levels, model: str, frames: list[int] | None, batch: int, quick: bool, cuda: bool) -> list[Case]:
    """The problem sizes of a run. Block level: ``batch`` videos for T <= 32, one video for the long
    clips; encoder level: one video; ``frames`` (if given) replaces the T values of both."""
    width, heads, l = _model_dims(model)
    cases = []
    if "attention" in levels:
        if quick:
            cases += [Case("attention", "frames", model, 2, 8, l, width, heads)]
            cases += [Case("attention", "messages", model, b, t, 0, width, heads) for t, b in ((8, 2), (64, 1))]
        else:
            n = 256 if cuda else 32  # frames per launch (DESIGN.md §6: N = 256, 12 heads of 64)
            for m in ("b32", "b16", "l14"):
                cases.append(Case("attention", "frames", m, n // 8, 8, _model_dims(m)[2], 12 * 64, 12))
            for t in (8, 32, 256, 1024) if cuda else (8, 32, 256):
                cases.append(Case("attention", "messages", model, max(1, n // t), t, 0, 12 * 64, 12))
    if "block" in levels:
        for t in frames or default_frames("block", quick, cuda):
            cases.append(Case("block", "block", model, batch if t <= 32 else 1, t, l, width, heads))
    if "encoder" in levels:
        chunk = 4 if quick else 8
        for t in frames or default_frames("encoder", quick, cuda):
            cases.append(Case("encoder", "encoder", model, 1, t, l, width, heads, chunk_frames=min(t, chunk)))
    return cases


# ------------------------------------------------------------------------------------------------
# workloads: inputs, providers, the tensors to check
# ------------------------------------------------------------------------------------------------
def _sdpa_ctx(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA[name])])


def _only_sdpa(name: str, fn):
    """``fn`` run with one SDPA backend allowed; a backend that cannot serve the inputs is a Skip."""
    def run():
        try:
            with _sdpa_ctx(name):
                return fn()
        except RuntimeError as exc:
            if "No viable backend" in str(exc) or "No available kernel" in str(exc):
                raise Skip(f"SDPA {SDPA[name]} cannot run these inputs here") from None
            raise
    return run


def _xformers_attention(device):
    """xformers' memory-efficient attention on (B, H, S, D) tensors (it takes (B, S, H, D))."""
    try:
        import xformers.ops as xops
    except Exception as exc:
        raise Skip(f"xformers is not installed or does not import ({type(exc).__name__})") from None
    if device.type != "cuda":
        raise Skip("xformers attention needs CUDA")
    mea = xops.memory_efficient_attention
    return lambda q, k, v: mea(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _compiled(fn, device, quick):
    if quick and device.type == "cpu":
        raise Skip("--quick: torch.compile warm-up takes minutes on CPU")
    try:
        return torch.compile(fn)
    except Exception as exc:  # pragma: no cover - platform dependent
        raise Skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}") from None


def _triton_or_skip(device):
    if device.type != "cuda":
        raise Skip("triton kernels need CUDA (the CPU interpreter checks correctness, it is not for timing)")
    ok, why = triton_status(device)
    if not ok:
        raise Skip(why)


class Workload:
    """Inputs and providers of one case, built deterministically from a seed."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device, grad: bool, quick: bool = False):
        self.case, self.dtype, self.device, self.grad, self.quick = case, dtype, device, grad, quick
        torch.manual_seed(0)
        getattr(self, f"_setup_{case.level}")()

    def _randn(self, *shape) -> torch.Tensor:
        """Inputs drawn in float32 on the CPU, then cast: the same values in every dtype and device."""
        return torch.randn(*shape).to(self.device, self.dtype)

    # -- attention -------------------------------------------------------------------------------
    def _setup_attention(self):
        c = self.case
        H, D = c.heads, c.width // c.heads
        if c.kind == "frames":
            N, l = c.batch * c.frames, c.tokens
            self.leaves = {"q": self._randn(N, l, H, D), "k": self._randn(N, l, H, D), "v": self._randn(N, l, H, D),
                           "q_msg": self._randn(N, H, D), "extra_k": self._randn(N, H, D),
                           "extra_v": self._randn(N, H, D)}
        else:
            self.leaves = {n: self._randn(c.batch, c.frames, H, D) for n in ("q", "k", "v")}
        for t in self.leaves.values():
            t.requires_grad_(self.grad)
        self.checked = [n for n in self.leaves if n != "q_msg"]

    def _original_attention(self, attend):
        """Concatenate the message token, attend over l+1 tokens (``attend`` on (B, H, S, D)), slice."""
        L = self.leaves
        if self.case.kind == "frames":
            q = torch.cat([L["q"], L["q_msg"][:, None]], dim=1)
            k = torch.cat([L["k"], L["extra_k"][:, None]], dim=1)
            v = torch.cat([L["v"], L["extra_v"][:, None]], dim=1)
        else:
            q, k, v = L["q"], L["k"], L["v"]
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return o[:, : L["q"].shape[1]]

    def _attention_provider(self, name):
        L = self.leaves
        if name == "reference":
            return lambda: self._original_attention(F.scaled_dot_product_attention)
        if name in SDPA:
            return _only_sdpa(name, lambda: self._original_attention(F.scaled_dot_product_attention))
        if name == "xformers":
            attend = _xformers_attention(self.device)
            return lambda: self._original_attention(attend)
        backend = name.removeprefix("xclip-fast-")
        if backend == "triton":
            _triton_or_skip(self.device)
        extra = (L["extra_k"], L["extra_v"]) if self.case.kind == "frames" else ()
        return lambda: fast_attention(L["q"], L["k"], L["v"], *extra, backend=backend)

    # -- block -----------------------------------------------------------------------------------
    def _setup_block(self):
        c = self.case
        self.ref = reference.CrossFramelAttentionBlock(c.width, c.heads, T=c.frames).to(self.device, self.dtype)
        self.fast = CrossFrameAttentionBlock(c.width, c.heads, T=c.frames).to(self.device, self.dtype)
        self.fast.load_state_dict(self.ref.state_dict())
        for m in (self.ref, self.fast):
            m.requires_grad_(self.grad)
        self.leaves = {"x": self._randn(c.tokens, c.batch * c.frames, c.width).requires_grad_(self.grad)}
        self.checked = ["x"]

    def _original_block_with(self, attend):
        """The official block's dataflow (concatenate, attend over l+1, slice) with ``attend`` on
        (B, H, S, D) tensors in place of ``nn.MultiheadAttention``'s internal attention."""
        blk, x, T = self.ref, self.leaves["x"], self.case.frames

        def mha(attn, y):  # y: (S, B, d) seq-first
            S, B, d = y.shape
            H = attn.num_heads
            qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(S, B, 3, H, d // H)
            q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.unbind(2))
            o = attend(q, k, v).permute(2, 0, 1, 3).reshape(S, B, d)
            return attn.out_proj(o)

        l, bt, d = x.shape
        b = bt // T
        xv = x.view(l, b, T, d)
        msg = blk.message_fc(xv[0]).view(b, T, d).transpose(0, 1)
        msg = msg + mha(blk.message_attn, blk.message_ln(msg))
        msg = msg.transpose(0, 1)[None]
        y = torch.cat([xv, msg], dim=0).view(l + 1, bt, d)
        y = (y + mha(blk.attn, blk.ln_1(y)))[:l]
        return y + blk.mlp(blk.ln_2(y))

    def _block_provider(self, name):
        x = self.leaves["x"]
        if name == "reference":
            return lambda: self.ref(x)
        if name == "reference-compiled":
            compiled = _compiled(self.ref, self.device, self.quick)
            return lambda: compiled(x)
        if name in SDPA:
            return _only_sdpa(name, lambda: self.ref(x))
        if name == "xformers":
            attend = _xformers_attention(self.device)
            return lambda: self._original_block_with(attend)
        backend = name.removeprefix("xclip-fast-")
        if backend == "triton":
            _triton_or_skip(self.device)

        def run():  # the block is shared by both fast providers: choose the backend at call time
            self.fast.backend = backend
            return self.fast(x)
        return run

    # -- encoder ---------------------------------------------------------------------------------
    def _setup_encoder(self):
        c = self.case
        p = PRESETS[c.model]
        self.enc = XCLIPVideoEncoder.from_config(c.model, num_frames=c.frames).to(self.device, self.dtype).eval()
        self.enc.requires_grad_(False)
        r = p["input_resolution"]
        self.leaves = {"video": self._randn(c.batch, c.frames, 3, r, r)}
        self.checked = []
        self.weights_mib = sum(t.numel() * t.element_size() for t in self.enc.parameters()) / MIB
        self.activation_mib = c.batch * c.frames * c.tokens * c.width * torch.finfo(self.dtype).bits / 8 / MIB

    def _reference_encoder(self):
        if not hasattr(self, "_ref_modules"):
            c, p = self.case, PRESETS[self.case.model]
            visual = reference.CrossFrameCommunicationTransformer(
                p["input_resolution"], p["patch_size"], p["width"], p["layers"], p["heads"], p["embed_dim"], T=c.frames)
            mit = reference.MultiframeIntegrationTransformer(c.frames, p["embed_dim"], p["mit_layers"], p["mit_heads"])
            sd = self.enc.state_dict()
            visual.load_state_dict({k[7:]: v for k, v in sd.items() if k.startswith("visual.")})
            mit.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("mit.")})
            self._ref_modules = (visual.to(self.device, self.dtype).eval(), mit.to(self.device, self.dtype).eval())
            for m in self._ref_modules:
                m.requires_grad_(False)
        return self._ref_modules

    def _encoder_provider(self, name):
        video = self.leaves["video"]
        c = self.case
        if name == "reference":
            visual, mit = self._reference_encoder()
            return lambda: mit(visual(video.flatten(0, 1))[0].view(c.batch, c.frames, -1))
        backend = name.removeprefix("xclip-fast-").removesuffix("-chunked")
        if backend == "triton":
            _triton_or_skip(self.device)
        chunk = c.chunk_frames if name.endswith("-chunked") else None
        enc = self.enc

        def run():
            enc.backend = backend
            return enc(video, chunk_frames=chunk)
        return run

    # -- common ----------------------------------------------------------------------------------
    def provider(self, name):
        """A callable running provider ``name`` once (forward only); raises :class:`Skip`."""
        if name not in PROVIDERS[self.case.level]:
            raise Skip(f"not a provider of the {self.case.level} level")
        return getattr(self, f"_{self.case.level}_provider")(name)

    def run(self, fn, mode: str, grad_out: torch.Tensor | None = None):
        """One call in ``mode``: forward under no_grad, or forward + backward from ``grad_out``."""
        if mode == "fwd":
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(grad_out if grad_out is not None else torch.ones_like(out))
        return out

    def clear_grads(self):
        for t in self.grad_tensors():
            t.grad = None

    def grad_tensors(self):
        tensors = list(self.leaves.values())
        for attr in ("ref", "fast"):
            if hasattr(self, attr):
                tensors += list(getattr(self, attr).parameters())
        return tensors

    def results(self, out, mode):
        """The tensors a provider is checked on: the output, and in fwdbwd the input gradients."""
        res = {"output": out.detach()}
        if mode == "fwdbwd":
            for n in self.checked:
                g = self.leaves[n].grad
                res[f"grad {n}"] = g.detach() if g is not None else torch.zeros_like(self.leaves[n])
        return res

    # -- attention cost model --------------------------------------------------------------------
    def flops(self, mode: str) -> float | None:
        """Useful FLOPs (the attention the model needs, not what a provider wastes)."""
        if self.case.level != "attention":
            return None
        c = self.case
        if c.kind == "frames":
            B, sq, sk = c.batch * c.frames, c.tokens, c.tokens + 1
        else:
            B, sq, sk = c.batch, c.frames, c.frames
        fwd = 4.0 * B * c.heads * sq * sk * (c.width // c.heads)  # QK^T and PV, 2 FLOPs per MAC
        return fwd if mode == "fwd" else 3.5 * fwd  # backward: 5 matmuls to the forward's 2

    def bytes(self, mode: str) -> float | None:
        """Compulsory bytes: fwd reads q, k, v (+ extra k, v) and writes o; fwdbwd also reads
        q, k, v, o, do (+ extra) and writes dq, dk, dv (+ extra dk, dv)."""
        if self.case.level != "attention":
            return None
        c = self.case
        elt = torch.finfo(self.dtype).bits // 8
        if c.kind == "frames":
            tok, extra = c.batch * c.frames * c.tokens * c.width, c.batch * c.frames * c.width
        else:
            tok, extra = c.batch * c.frames * c.width, 0
        fwd = (4 * tok + 2 * extra) * elt
        return fwd if mode == "fwd" else fwd + (8 * tok + 4 * extra) * elt


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
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


def time_interleaved(fns: dict, quick: bool) -> dict:
    """CPU timing of several callables in alternating rounds (A B C A B C ...), so that drifts of a
    shared machine (other load, clocks) hit every provider alike. Returns name -> (median, p20, p80)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    rounds = 5 if quick else 15
    budget = (0.6 if quick else 4.0) / max(1, len(fns))  # seconds per provider per run
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                if time.perf_counter() - start > budget / rounds:
                    break
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9
        out[name] = (statistics.median(ts), q[1], q[7])
    return out


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


def _rss_probe(case, dtype_name, provider, mode, quick):
    """Runs in a fresh process: the resident-memory growth of one call (bytes)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    w = Workload(case, DTYPES[dtype_name], torch.device("cpu"), grad=mode == "fwdbwd", quick=quick)
    fn = w.provider(provider)
    w.run(fn, mode)  # warm-up: one-time allocations (kernel libraries, thread pools) are not the op's
    w.clear_grads()
    gc.collect()
    base = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    w.run(fn, mode)
    return _proc_status("VmHWM") - base


_POOL = None


def cpu_memory(case, dtype, provider, mode, quick):
    """Peak resident-memory growth (MiB) of one call, measured in a fresh process (forkserver:
    torch is imported once, each measurement forks a clean child)."""
    global _POOL
    import multiprocessing as mp

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    if _POOL is None:
        _POOL = mp.get_context("forkserver")
        _POOL.set_forkserver_preload(["torch", "xclip_fast.bench"])
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
        dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        return pool.apply(_rss_probe, (case, dtype_name, provider, mode, quick)) / MIB


def copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written)."""
    n = (512 if device.type == "cuda" else 64) * MIB
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device, quick=True)
    return 2 * n / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: Case
    dtype: str
    mode: str
    provider: str
    status: str  # ok | skipped | mismatch | oom | error
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mib: float | None = None
    extra_mib: float | None = None
    error: float | None = None
    tolerance: float | None = None
    checked_against: str = ""
    tflops: float | None = None
    gbps: float | None = None
    bandwidth_fraction: float | None = None
    speedup: float | None = None
    memory_ratio: float | None = None
    extras: dict = field(default_factory=dict)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _truth(case, mode, device, quick):
    """High-precision results (float64 CPU / float32 CUDA without TF32) of the first provider that
    runs: the reference, else the fast torch path (e.g. when the reference runs out of memory)."""
    hi = torch.float64 if device.type == "cpu" else torch.float32
    order = ["reference", "xclip-fast-torch"] + (["xclip-fast-torch-chunked"] if case.level == "encoder" else [])
    for name in order:
        try:
            w = Workload(case, hi, device, grad=mode == "fwdbwd", quick=quick)
            out = w.run(w.provider(name), mode, _grad_out(w, mode))
            res = {k: v.float().cpu() for k, v in w.results(out, mode).items()}
            del w, out
            _free(device)
            return res, name
        except Exception as exc:
            _free(device)
            if not _is_oom(exc):
                raise
    return None, "nothing fits in memory"


def _grad_out(w, mode, seed=1):
    """The output gradient of fwdbwd runs: the same values for every provider and precision."""
    if mode == "fwd":
        return None
    c = w.case
    H, D = c.heads, c.width // c.heads
    shape = {"frames": (c.batch * c.frames, c.tokens, H, D), "messages": (c.batch, c.frames, H, D),
             "block": (c.tokens, c.batch * c.frames, c.width)}[c.kind]
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(w.device, w.dtype)


def _timed(work, fn, mode, grad_out):
    if mode == "fwdbwd":
        def call():
            work.clear_grads()
            return work.run(fn, mode, grad_out)
        return call
    return lambda: work.run(fn, mode)


def run_case(case, dtype, mode, providers, device, quick, copy_bw):
    """All providers of one case and mode: check each against the high-precision truth, then time
    them (interleaved on CPU), then measure their memory."""
    rows = []
    truth, truth_name = _truth(case, mode, device, quick)
    tol = TOLERANCES[dtype]
    work = Workload(case, dtype, device, grad=mode == "fwdbwd", quick=quick)
    grad_out = _grad_out(work, mode)
    ref_err = None
    timed = {}
    for name in providers:
        row = Row(case, str(dtype).removeprefix("torch."), mode, name, "ok", checked_against=truth_name)
        rows.append(row)
        try:
            fn = work.provider(name)
            work.clear_grads()
            out = work.run(fn, mode, grad_out)
            if truth is not None:
                errs = {k: rel_err(v.float().cpu(), truth[k]) for k, v in work.results(out, mode).items()}
                row.error = max(errs.values())
                if name == "reference":
                    ref_err = row.error
                # the reference's own low-precision error sets the bar (at most 10x the dtype's tolerance)
                row.tolerance = min(max(tol, 2 * ref_err), 10 * tol) if ref_err is not None else tol
                if not row.error <= row.tolerance:
                    worst = max(errs, key=errs.get)
                    row.status, row.reason = "mismatch", f"{worst}: error {errs[worst]:.2e} > {row.tolerance:.1e}"
            del out
            if row.status == "ok":
                timed[name] = _timed(work, fn, mode, grad_out)
        except Exception as exc:
            _fail(row, exc)
        finally:
            work.clear_grads()
            _free(device)
    by_name = {r.provider: r for r in rows}
    if device.type == "cpu" and timed:
        for name, (med, p20, p80) in time_interleaved(timed, quick).items():
            by_name[name].median_ms, by_name[name].p20_ms, by_name[name].p80_ms = med, p20, p80
    for name, fn in timed.items():
        row = by_name[name]
        try:
            if device.type == "cuda":
                row.median_ms, row.p20_ms, row.p80_ms = time_ms(fn, device, quick)
                row.peak_mib, row.extra_mib = cuda_memory(fn, device)
            else:
                row.extra_mib = cpu_memory(case, dtype, name, mode, quick)
        except Exception as exc:
            _fail(row, exc)
        finally:
            work.clear_grads()
            _free(device)
    flops, nbytes = work.flops(mode), work.bytes(mode)
    ref = by_name.get("reference")
    for row in rows:
        if case.level == "encoder":
            row.extras = dict(weights_mib=work.weights_mib, activation_mib=work.activation_mib)
        if row.status != "ok" or row.median_ms is None:
            continue
        if flops:
            row.tflops = flops / (row.median_ms * 1e-3) / 1e12
            row.gbps = nbytes / (row.median_ms * 1e-3) / 1e9
            row.bandwidth_fraction = row.gbps / copy_bw if copy_bw else None
        if ref is not None and ref.status == "ok" and ref.median_ms:
            row.speedup = ref.median_ms / row.median_ms
            if row.extra_mib is not None and ref.extra_mib:
                row.memory_ratio = row.extra_mib / ref.extra_mib
    del work
    _free(device)
    return rows


def _fail(row, exc):
    if isinstance(exc, Skip):
        row.status, row.reason = "skipped", str(exc)
        return
    row.status = "oom" if _is_oom(exc) else "error"
    first = str(exc).splitlines()[0] if str(exc) else ""
    row.reason = f"{type(exc).__name__}: {first}"[:200]


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def environment(device) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return "not installed"

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return dict(timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                device=name, torch=torch.__version__, triton=version("triton"), xformers=version("xformers"))


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows, env) -> str:
    lines = [f"xclip-fast bench - {env['device']} - torch {env['torch']}, triton {env['triton']}, "
             f"xformers {env['xformers']} - commit {env['commit']} - {env['timestamp']}",
             "time: median (p20-p80) ms; speedup and memory ratio against 'reference'; mem: MiB allocated above "
             "inputs and weights during the call (CUDA) / resident-memory growth in a fresh process (CPU)"]
    header = f"{'case':38s} {'dtype':8s} {'mode':6s} {'provider':26s} {'time ms':>22s} {'speedup':>8s} " \
             f"{'mem MiB':>9s} {'mem x':>6s} {'TFLOP/s':>8s} {'GB/s':>7s} {'%copy':>6s} {'error':>8s}"
    lines += [header, "-" * len(header)]
    last = None
    for r in rows:
        key = (r.case.label, r.dtype, r.mode)
        if last is not None and key != last:
            lines.append("")
        last = key
        if r.status != "ok":
            lines.append(f"{r.case.label:38s} {r.dtype:8s} {r.mode:6s} {r.provider:26s} {r.status.upper()}: {r.reason}")
            continue
        t = f"{r.median_ms:.3f} ({r.p20_ms:.3f}-{r.p80_ms:.3f})"
        frac = _fmt(r.bandwidth_fraction and 100 * r.bandwidth_fraction, ".0f")
        lines.append(f"{r.case.label:38s} {r.dtype:8s} {r.mode:6s} {r.provider:26s} {t:>22s} "
                     f"{_fmt(r.speedup, '.2f'):>8s} {_fmt(r.extra_mib, '.1f'):>9s} {_fmt(r.memory_ratio, '.2f'):>6s} "
                     f"{_fmt(r.tflops, '.2f'):>8s} {_fmt(r.gbps, '.0f'):>7s} {frac:>6s} {_fmt(r.error, '.1e'):>8s}")
    return "\n".join(lines)


def _record(r: Row, env: dict) -> dict:
    c = r.case
    rec = {**env, "level": c.level, "case": c.label, "model": c.model, "dtype": r.dtype, "mode": r.mode,
           "batch": c.batch, "frames": c.frames, "tokens": c.tokens, "provider": r.provider, "status": r.status,
           "reason": r.reason}
    for k in ("median_ms", "p20_ms", "p80_ms", "speedup", "peak_mib", "extra_mib", "memory_ratio", "tflops", "gbps",
              "bandwidth_fraction", "error", "tolerance", "checked_against"):
        rec[k] = getattr(r, k)
    return rec


def write_outputs(rows, env, out_dir, copy_bw) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    records = [_record(r, env) for r in rows]
    csv_path = os.path.join(out_dir, "results.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for rec in records:
            writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        for rec, r in zip(records, rows):
            f.write(json.dumps({**rec, **r.extras}) + "\n")
    stamp = env["timestamp"].replace(":", "").replace("-", "")
    run_path = os.path.join(out_dir, f"run-{stamp}.json")
    with open(run_path, "w") as f:
        json.dump({"environment": env, "copy_bandwidth_gbps": copy_bw,
                   "rows": [{**rec, **r.extras} for rec, r in zip(records, rows)]}, f, indent=1)
    paths = {"csv": csv_path, "jsonl": os.path.join(out_dir, "results.jsonl"), "run": run_path}
    png = plot(rows, env, out_dir)
    if png:
        paths["png"] = png
    elif png is None:
        print("no plot: matplotlib is not installed (pip install 'xclip-fast[bench]')")
    return paths


def plot(rows, env, out_dir):
    """Speedup and memory against T per provider (block and encoder levels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = {}
    for r in rows:
        if r.status == "ok" and r.case.level in ("block", "encoder"):
            groups.setdefault((r.case.level, r.case.model, r.dtype, r.mode), []).append(r)
    if not groups:
        return ""  # nothing to plot (attention level only)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for (ax_s, ax_m), ((level, model, dtype, mode), rs) in zip(axes, sorted(groups.items())):
        for prov in sorted({r.provider for r in rs}):
            pts = sorted((r.case.frames, r.speedup, r.extra_mib) for r in rs if r.provider == prov)
            ts = [p[0] for p in pts]
            ax_s.plot(ts, [p[1] for p in pts], marker="o", label=prov)
            ax_m.plot(ts, [p[2] for p in pts], marker="o", label=prov)
        for ax, what in ((ax_s, "speedup vs reference"), (ax_m, "memory MiB (above inputs+weights)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("frames T")
            ax.set_ylabel(what)
            ax.set_title(f"{level} {model} {dtype} {mode}", fontsize=9)
            ax.grid(alpha=0.3)
        ax_m.set_yscale("log")
        ax_s.legend(fontsize=7)
    fig.suptitle(f"{env['device']} - torch {env['torch']} - {env['timestamp']}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"bench-{env['timestamp'].replace(':', '').replace('-', '')}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _progress(total):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    except Exception:
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_description(self, _):
                pass

            def close(self):
                print(file=sys.stderr)

        return _Plain()


def main(args) -> int:
    """``xclip-fast bench``: see ``xclip-fast bench --help``."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"--dtype {args.dtype} on CPU: use float32 (half-precision CPU kernels are not what "
                         "anyone runs X-CLIP on)")
    levels = LEVELS if args.level == "all" else (args.level,)
    model = args.model or ("b16" if cuda else "b32")
    frames = [int(t) for t in args.frames.split(",")] if args.frames else None
    batch = args.batch or (8 if cuda else 1)
    modes = MODES if args.mode == "both" else (args.mode,)
    wanted = args.providers.split(",") if args.providers else None
    if wanted:
        unknown = sorted(set(wanted) - set(ALL_PROVIDERS))
        if unknown:
            raise ValueError(f"unknown providers {unknown}; choose from {ALL_PROVIDERS}")
        if "reference" not in wanted:
            wanted = ["reference", *wanted]  # every ratio is against the reference
    if not cuda:
        print("CPU run: the triton provider is left out (Triton kernels need CUDA; on CPU they run only in the "
              "interpreter, which checks correctness and is not for timing).")
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
    cases = build_cases(levels, model, frames, batch, args.quick, cuda)
    env = environment(device)
    copy_bw = copy_bandwidth(device)
    plan = [(c, m, [p for p in PROVIDERS[c.level] if not wanted or p in wanted])
            for c in cases for m in modes if not (c.level == "encoder" and m == "fwdbwd")]
    bar = _progress(sum(len(ps) for _, _, ps in plan))
    rows = []
    for case, mode, provs in plan:
        bar.set_description(f"{case.label} {mode}")
        rows += run_case(case, dtype, mode, provs, device, args.quick, copy_bw)
        bar.update(len(provs))
    bar.close()
    print(table(rows, env))
    print(f"copy bandwidth: {copy_bw:.0f} GB/s (read + write)")
    paths = write_outputs(rows, env, args.out, copy_bw)
    print("wrote " + ", ".join(paths.values()))
    bad = [r for r in rows if r.status in ("mismatch", "error")]
    if bad:
        print(f"{len(bad)} provider run(s) disagreed with the reference or failed:", file=sys.stderr)
        for r in bad:
            print(f"  {r.case.label} {r.mode} {r.provider}: {r.status}: {r.reason}", file=sys.stderr)
        return 1
    return 0


def add_arguments(p) -> None:
    p.add_argument("--level", default="all", choices=[*LEVELS, "all"])
    p.add_argument("--model", default=None, choices=sorted(PRESETS), help="default b16 on CUDA, b32 on CPU")
    p.add_argument("--frames", default=None, help="comma list of T for the block and encoder levels (default: "
                   "8,16,32 and long clips up to 512 for blocks, 8 to 1024 for the encoder on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="videos b at the block level for T <= 32 (default 8 on "
                   "CUDA, 1 on CPU; long clips run one video)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--mode", default="both", choices=[*MODES, "both"])
    p.add_argument("--providers", default=None, help=f"comma list from {', '.join(ALL_PROVIDERS)}")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", default="bench-results", help="folder for results.csv/.jsonl, run JSON and the plot")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (under 2 minutes on 2 CPU cores)")

