"""Our kernels one launch at a time: what the tuner, the bench's attention level and the lab time,
each kernel on its own row (the sequence kernels' forward and one-launch backward, the packed kernels'
forward and three backward launches apart, QuickGELU's forward and backward apart), with the FLOPs and
the bytes each must move.

Launches go straight to the launchers of :mod:`xclip_fast.kernels` on buffers made once, outside any
operator or autograd; a timer (:mod:`xclip_fast.bench.gputime`) captures them in a CUDA graph.
"""

from __future__ import annotations

import torch

from xclip_fast.bench.gputime import measure_or_profile, rotation
from xclip_fast.bench.results import Result
from xclip_fast.dtypes import dtype_name

__all__ = ["ATTENTION_KERNELS", "QUICK_GELU_KERNELS", "KERNEL_NAMES", "AttentionProblem", "QuickGELUProblem",
           "problems", "time_kernels", "kernel_rows", "l2_bytes"]

# every attention row: the sequence kernels' two, then the packed kernels' four (a problem runs one family:
# AttentionProblem.kernels)
ATTENTION_KERNELS = ("fwd", "bwd", "packed_fwd", "packed_delta", "packed_dkdv", "packed_dq")
QUICK_GELU_KERNELS = ("quick_gelu_fwd", "quick_gelu_bwd")
# each row's kernel -> the name its launch compiles to (what a profiler shows); the sequence backward
# adds _sequence_dq_sum_kernel when it splits key chunks (fewer sequences x heads than SMs)
KERNEL_NAMES = {"fwd": "_sequence_fwd_kernel", "bwd": "_sequence_bwd_kernel", "packed_fwd": "_packed_fwd_kernel",
                "packed_delta": "_packed_bwd_delta_kernel", "packed_dkdv": "_packed_bwd_kernel_dkdv",
                "packed_dq": "_packed_bwd_kernel_dq",
                "quick_gelu_fwd": "_quick_gelu_fwd_kernel", "quick_gelu_bwd": "_quick_gelu_bwd_kernel"}
_PACKED_PASS = {"packed_delta": "delta", "packed_dkdv": "dkdv", "packed_dq": "dq"}


def l2_bytes(device) -> int | None:
    """The L2 cache of a CUDA device in bytes (None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)


class AttentionProblem:
    """The buffers of one attention problem and each of our kernels as one launch.

    ``q, k, v: [B, S, H, D]`` (and with ``extra`` the extra token's key and value ``[B, H, D]``: the
    frame attention with its message token; without it the message attention), ``out``, ``lse``,
    the output gradient ``do``, ``delta`` and the gradients. :meth:`prepare` runs the forward (and the
    packed kernels' ``delta`` pass) once, so that each backward launch alone reads real statistics."""

    def __init__(self, B, S, H, D, dtype, device, extra: bool, seed: int = 0):
        from xclip_fast.kernels import acc_dtype

        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(seed) if device.type != "meta" else None  # (sizes only)

        def t(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

        self.shape, self.dtype = (B, S, H, D), dtype
        self.q, self.k, self.v = t(B, S, H, D), t(B, S, H, D), t(B, S, H, D)
        self.ek, self.ev = (t(B, H, D), t(B, H, D)) if extra else (None, None)
        self.scale = D ** -0.5
        self.o = torch.empty_like(self.q)
        self.lse = torch.empty(B, H, S, device=device, dtype=acc_dtype(dtype))
        self.delta = torch.empty_like(self.lse)
        self.do = t(B, S, H, D)
        self.grads = [torch.empty_like(x) for x in (self.q, self.k, self.v)]
        self.grads += [torch.empty_like(self.ek), torch.empty_like(self.ev)] if extra else [None, None]
        self._kernels = None

    @property
    def extra(self) -> bool:
        return self.ek is not None

    def kernels(self, plan=None) -> tuple[str, ...]:
        """The rows of one forward and backward with ``plan`` (default: the launchers'): ``("fwd", "bwd")``
        or, where short sequences are packed, ``("packed_fwd", "packed_delta", "packed_dkdv", "packed_dq")``."""
        from xclip_fast.kernels import attention as A
        from xclip_fast.kernels.plan import plan_for

        S = self.shape[1]
        if plan is not None:
            return A.kernels_of(plan, S, S)
        if self._kernels is None:  # (asked on every launch: the launchers' plan is looked up once)
            self._kernels = A.kernels_of(plan_for(self.q, S, self.extra, False), S, S)
        return self._kernels

    def launch(self, kernel: str, plan=None) -> None:
        """One launch of ``kernel`` (one of :meth:`kernels`) with ``plan`` (default: the launchers')."""
        from xclip_fast.kernels import attention as A

        assert kernel in self.kernels(plan), f"{kernel} is not a kernel of this problem: {self.kernels(plan)}"
        if kernel in ("fwd", "packed_fwd"):
            A.attention_fwd(self.q, self.k, self.v, self.ek, self.ev, self.o, self.lse, self.scale, False, plan=plan)
            return
        passes = (_PACKED_PASS[kernel],) if kernel in _PACKED_PASS else None
        A.attention_bwd(self.q, self.k, self.v, self.ek, self.ev, self.o, self.lse, self.do, *self.grads, self.scale,
                        False, plan=plan, passes=passes, delta=self.delta if passes else None)

    def prepare(self, plan=None) -> None:
        """The forward (and the packed ``delta`` pass), whose results the backward launches read."""
        for kernel in self.kernels(plan):
            if kernel in ("fwd", "packed_fwd", "packed_delta"):
                self.launch(kernel, plan)

    def results(self, plan=None) -> tuple[torch.Tensor, ...]:
        """out, dq, dk, dv of one forward and backward (every launch) with ``plan``."""
        for kernel in self.kernels(plan):
            self.launch(kernel, plan)
        return self.o.clone(), *(g.clone() for g in self.grads[:3])

    def _dims(self):
        B, S, H, D = self.shape
        return B * H, S, S + self.extra, D

    def flops(self, kernel: str) -> float | None:
        """The matmul FLOPs ``kernel`` runs: a forward 2 products (QK^T, PV), the sequence backward 5
        (S, dV, dP, dK, dQ: P computed once), the packed dk/dv pass 4 (it recomputes P and dP), the
        packed dq pass 3; None for the packed ``delta`` pass (no matmul)."""
        products = {"fwd": 2, "packed_fwd": 2, "bwd": 5, "packed_dkdv": 4, "packed_dq": 3}.get(kernel)
        if products is None:
            return None
        n, sq, sk, d = self._dims()
        return products * 2.0 * n * sq * sk * d

    def bytes(self, kernel: str) -> float:
        """The bytes ``kernel`` must move: each tensor it reads read once, each it writes written once."""
        n, sq, _, d = self._dims()
        elt, acc = self.q.element_size(), self.lse.element_size()
        tok, stat = n * sq * d * elt, n * sq * acc  # one [B, S, H, D] tensor, one row statistic
        extra = n * d * elt if self.extra else 0  # one extra-token tensor
        fwd = 4 * tok + 2 * extra + stat  # q, k, v, (ek, ev) -> o, lse
        return {"fwd": fwd, "packed_fwd": fwd,
                # q, k, v, o, do, lse, (ek, ev) -> dq, dk, dv, (dek, dev); its scratch stays in L2 (the dq
                # partials of split key chunks, a small grid's, are not counted)
                "bwd": 8 * tok + 4 * extra + stat,
                "packed_delta": 2 * tok + stat,  # o, do -> delta
                "packed_dkdv": 6 * tok + 2 * stat,  # q, k, v, do, lse, delta -> dk, dv
                "packed_dq": 5 * tok + 2 * stat,  # q, k, v, do, lse, delta -> dq
                }[kernel]


class QuickGELUProblem:
    """One QuickGELU activation of ``n`` elements: forward and backward each as one launch."""

    def __init__(self, n: int, dtype, device, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(n, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.dy = torch.randn(n, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.y, self.dx = torch.empty_like(self.x), torch.empty_like(self.x)

    def launch(self, kernel: str, config=None) -> None:
        from xclip_fast.kernels import quick_gelu as Q

        if kernel == "quick_gelu_fwd":
            Q.quick_gelu_fwd(self.x, self.y, config)
        else:
            Q.quick_gelu_bwd(self.x, self.dy, self.dx, config)

    def flops(self, kernel: str) -> None:
        return None

    def bytes(self, kernel: str) -> float:
        """Forward: x -> y; backward: x, dy -> dx."""
        return (2 if kernel == "quick_gelu_fwd" else 3) * self.x.numel() * self.x.element_size()


def problems(B, S, H, D, dtype, device, extra: bool) -> list[AttentionProblem]:
    """One problem and, where its forward's bytes are under three times L2, copies on other inputs
    to cycle through (:func:`~xclip_fast.bench.gputime.rotation`)."""
    first = AttentionProblem(B, S, H, D, dtype, device, extra)
    sets = rotation(first.bytes("fwd"), l2_bytes(device))
    return [first] + [AttentionProblem(B, S, H, D, dtype, device, extra, seed=i) for i in range(1, sets)]


def time_kernels(probs: list[AttentionProblem], kernels, timer, device, plan=None) -> dict:
    """kernel -> :class:`~xclip_fast.bench.gputime.Timing` of each kernel launched alone, on each
    input set in turn (the problems are prepared first, so the backward passes read real statistics).
    ``kernels``: names of :data:`ATTENTION_KERNELS`; those the problems do not run are left out."""
    kernels = [k for k in kernels if k in probs[0].kernels(plan)]
    for p in probs:
        p.prepare(plan)
    return {k: measure_or_profile(timer, [lambda p=p, k=k: p.launch(k, plan) for p in probs], device)
            for k in kernels}


def kernel_rows(case, dtype, mode: str, device, env: dict, timer, copy_bw: float | None,
                provider: str = "xclip-fast-triton") -> list[Result]:
    """The bench's kernel rows of one attention case: each of our kernels the mode runs (the forward; or
    every launch of :meth:`AttentionProblem.kernels`) launched alone and timed by ``timer``, one row each,
    named ``<provider>/<kernel>``, with the host time per launch in ``extras``."""
    H, D = case.heads, case.width // case.heads
    if case.kind == "frames":
        B, S, extra = case.batch * case.frames, case.tokens, True
    else:
        B, S, extra = case.batch, case.frames, False
    probs = problems(B, S, H, D, dtype, device, extra)
    rows = []
    kernels = probs[0].kernels()
    timings = time_kernels(probs, kernels if mode == "fwdbwd" else kernels[:1], timer, device)
    for kernel, t in timings.items():
        row = Result.make(env, case, dtype_name(dtype), mode, f"{provider}/{kernel}",
                          reason=f"{KERNEL_NAMES[kernel]} launched alone")
        row.median_ms, row.p20_ms, row.p80_ms = t.ms, t.p20, t.p80
        row.extras.update(host_ms=t.host_ms, timing=t.how, kernel=KERNEL_NAMES[kernel], input_sets=len(probs))
        flops, nbytes = probs[0].flops(kernel), probs[0].bytes(kernel)
        row.tflops = flops / (t.ms * 1e-3) / 1e12 if flops else None
        row.gbps = nbytes / (t.ms * 1e-3) / 1e9
        row.bandwidth_fraction = row.gbps / copy_bw if copy_bw else None
        rows.append(row)
    return rows
