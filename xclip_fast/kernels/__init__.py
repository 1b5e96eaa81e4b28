"""Triton kernels of xclip-fast (installed as ``xclip_fast.kernels``).

Only ``@triton.jit`` functions, their launchers and their launch plans live here; operator
registration, autograd, input checks and backend dispatch are in ``xclip_fast``.
"""

import torch
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton

_FAKE, _PROXY, _FUNCTIONAL = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
                               torch._C._TorchDispatchModeKey.FUNCTIONAL)
_stack_len, _infra_mode = torch._C._len_torch_dispatch_stack, torch._C._get_dispatch_mode

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every accumulator and statistic (log-sum-exp): fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return _TL[dtype]


def cdiv(a, b):
    """``ceil(a / b)`` in plain integer arithmetic (symbolic sizes too; ``triton.cdiv`` unwraps constexprs
    on every call, which the launchers make several times a launch)."""
    return (a + b - 1) // b


def dispatch_mode_active() -> bool:
    """Whether a dispatch mode is active here: a fake, proxy or functional mode (``torch.compile``,
    ``torch.export`` and ``make_fx`` run a ``triton_op``'s body under them) or any mode on the stack (a
    user's, e.g. ``FlopCounterMode``). Inside a mode's own handler the mode is off the stack: a call
    that a mode hands on (as AOTAutograd's runtime checks do) runs eagerly."""
    return (_stack_len() > 0 or _infra_mode(_FAKE) is not None or _infra_mode(_PROXY) is not None
            or _infra_mode(_FUNCTIONAL) is not None)


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def wrap_triton(kernel):
    """The launcher of ``kernel``: the kernel itself for an eager launch, ``torch.library.wrap_triton(kernel)``
    while a graph is traced.

    A launch is traced only under a dispatch mode: the fake, functional and proxy modes through which
    ``torch.compile``, ``torch.export`` and ``make_fx`` run a ``triton_op``'s body, where the wrapper
    records the kernel in the graph. Everywhere else the launch is eager and goes straight to the kernel:
    outside a ``triton_op`` (the tuner, the lab, the opaque operators), ``torch.library.wrap_triton``
    would otherwise send every launch through its tracing path, which costs host time and keeps one
    entry per call in PyTorch's kernel side table. Kernels of Triton's interpreter (``TRITON_INTERPRET=1``)
    launch as they are."""
    if not dispatch_mode_active() or _interpreted(kernel):
        return kernel
    return _torch_wrap_triton(kernel)
