"""Error measures and tolerances shared by the tests, ``xclip-fast check`` and the benchmarks,
synthetic videos for the tests and benchmarks of video reading, and saved-tensor hooks that copy
what autograd saves (activation offloading's effect, on any device)."""

from __future__ import annotations

import math

import torch

__all__ = ["rel_err", "attention_f64", "TOLERANCES", "TF32_TOLERANCE", "write_video", "copied_saved_tensors"]

# Relative error ||out - ref|| / ||ref|| allowed against a float64 reference, per input dtype.
TOLERANCES = {
    # fp64 kernels accumulate in fp64: only reduction-order rounding (~1e-16 per op) remains
    torch.float64: 1e-10,
    # exact fp32 dot products, fp32 accumulation: ~1e-7 per op, amplified by softmax and long sums
    torch.float32: 1e-5,
    # 10-bit mantissa inputs (eps 4.9e-4); fp32 accumulation keeps the error near the input rounding
    torch.float16: 2e-3,
    # 7-bit mantissa inputs (eps 3.9e-3)
    torch.bfloat16: 1e-2,
}
# fp32 inputs when the user enabled TF32 (10-bit mantissa products): fp16's bound, which has the same
# mantissa. Triton hands fp32 operands to the TF32 tensor cores unrounded (the low 13 bits are dropped,
# a known difference from cuBLAS, which rounds): measured on an H200 (2026-12-04, triton 3.6) at
# B=4, l=197, 4 heads, D=64: our output 1.42e-3 where PyTorch's TF32 math path gave 2.9e-4
TF32_TOLERANCE = 2e-3
# On a GPU a kernel is also held to PyTorch's own error on the same inputs in the same dtype (float64
# truth): at most this multiple of it in the forward and in the gradients, which add more roundings
OWN_ERROR_FORWARD, OWN_ERROR_GRADIENT = 2.0, 3.0


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """``||out - ref|| / ||ref||`` in float64 (on the CPU); ``inf`` if ``out`` holds a NaN or an inf (fails
    loudly). ``scale``: a reference whose norm is at most 1e-9 of it (zero in exact arithmetic, what is
    left is rounding noise) is measured against ``scale`` instead, e.g. the largest norm of its set."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    out64, ref64 = out.detach().cpu().double(), ref.detach().cpu().double()
    if not torch.isfinite(out64).all():
        return math.inf
    norm = ref64.norm().item()
    denom = scale if norm <= 1e-9 * scale else norm
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def attention_f64(q, k, v, extra_k=None, extra_v=None, scale=None):
    """Plain float64 attention on (B, S, H, D) tensors with an optional extra token (einsum and
    softmax, no SDPA): the independent truth of the kernels' tests and of ``tests/sanitize.py``."""
    q, k, v = q.double(), k.double(), v.double()
    if extra_k is not None:
        k = torch.cat([k, extra_k.double()[:, None]], dim=1)
        v = torch.cat([v, extra_v.double()[:, None]], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def write_video(path, frames: int, frame=None, *, rate: int = 10, gop: int = 10, width: int = 48, height: int = 40,
                codec: str = "mpeg4", options: dict | None = None) -> str:
    """Write a synthetic video with PyAV (tests and benchmarks): ``frame(i) -> (height, width, 3)`` uint8
    RGB gives frame i (default: red level 6 i and a green square moving with i, so frames differ).
    ``gop``: frames between key frames; ``options``: muxer options (``{"movflags": "faststart"}``)."""
    import av
    import numpy as np

    def default(i):
        img = np.zeros((height, width, 3), np.uint8)
        img[:, :, 0] = (6 * i) % 256
        x0 = (3 * i) % max(1, width - 8)
        img[8:16, x0:x0 + 8, 1] = 255
        return img

    frame = frame or default
    container = av.open(str(path), "w", options=options or {})
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    container.start_encoding()
    for i in range(frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def copied_saved_tensors():
    """Saved-tensor hooks that give the backward a copy of every tensor autograd saves, made when it
    is saved: what ``torch.autograd.graph.save_on_cpu()`` does to a GPU tensor (a copy in host
    memory), also for CPU tensors (which ``save_on_cpu`` keeps as they are): a backward that reads
    anything but what was saved, as it was when saved, gives a different result."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t)
