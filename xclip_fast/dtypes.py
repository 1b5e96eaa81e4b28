"""The floating dtypes xclip-fast supports, and their names on the command line (one table)."""

import torch

__all__ = ["FLOAT_DTYPES", "BY_NAME", "dtype_name"]

# fp16 / bf16 / fp32 / fp64: every backend, every module; the kernels accumulate in fp32 (fp64 for fp64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the names the command line takes)."""
    return str(dtype).removeprefix("torch.")
