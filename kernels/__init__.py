"""Triton kernels of xclip-fast (installed as ``xclip_fast.kernels``).

Only ``@triton.jit`` functions, their launchers and their launch plans live here; operator
registration, autograd, input checks and backend dispatch are in ``xclip_fast``.
"""

try:
    from torch.library import wrap_triton as _torch_wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6
    _torch_wrap_triton = None


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` where it applies: launches inside a ``triton_op`` that
    ``torch.compile`` traces become graph nodes, eager launches go straight to the kernel. Kernels of
    Triton's interpreter (``TRITON_INTERPRET=1``) and older torch launch as they are."""
    if _torch_wrap_triton is None or type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return _torch_wrap_triton(kernel)
