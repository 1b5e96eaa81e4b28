"""The floating dtypes xclip-fast supports, their names on the command line (one table), and the
default dtype of inference on a device."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "BY_NAME", "dtype_name", "cpu_native_bf16", "inference_dtype", "chosen_dtype"]

# fp16 / bf16 / fp32 / fp64: every backend, every module; the kernels accumulate in fp32 (fp64 for fp64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the names the command line takes)."""
    return str(dtype).removeprefix("torch.")


def cpu_native_bf16() -> str | None:
    """The bf16 instructions this CPU has, as PyTorch reports them (``"AMX"``, ``"AVX512-BF16"``), or
    None. Without them PyTorch emulates bf16 arithmetic in fp32 and bf16 is no faster."""
    cpu = getattr(torch, "cpu", None)
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(cpu, probe)():
                return name
        except Exception:  # a private probe that a release renamed or dropped: no claim of native bf16
            continue
    return None


def inference_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """The default dtype of inference on ``device`` and why: float16 on CUDA; on a CPU with native
    bf16 (:func:`cpu_native_bf16`) bfloat16 (B/32 on a 2-core AVX512-BF16 CPU: 1.8x the float32
    throughput at the original model's own bf16 error, relative 5e-3; docs/deploy.md); float32 on
    other CPUs."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16, "CUDA: float16"
    native = cpu_native_bf16()
    if native:
        return torch.bfloat16, f"this CPU has native bf16 ({native}): bfloat16 (--dtype float32 for float32)"
    return torch.float32, "CPU without native bf16: float32"


def chosen_dtype(name: str | None, device: torch.device, announce: bool = True) -> torch.dtype:
    """A ``--dtype`` option: the named dtype if given, else :func:`inference_dtype` of ``device``,
    announced on stdout when it is not float32 on a CPU (so that nobody gets bf16 unawares)."""
    if name is not None:
        return BY_NAME[name]
    dtype, why = inference_dtype(device)
    if announce and torch.device(device).type == "cpu" and dtype != torch.float32:
        print(f"dtype: {why}")
    return dtype
