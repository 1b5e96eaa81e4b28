"""Trace the GPU form of the operators without a GPU (run as a script, never with TRITON_INTERPRET).

On CUDA the operators are ``torch.library.triton_op``: their bodies are their own fake
implementations, and under functionalization (what torch.compile's AOTAutograd does) they decompose
into ``triton_kernel_wrapper_functional`` nodes that Inductor schedules. This script builds fake CUDA
tensors on a machine without one, traces every operator that way and prints one JSON line per
operator: the kernels that appear, the inputs each kernel node has cloned before it runs (what
PyTorch's analysis of the kernel's Triton IR found it writes; a kernel it cannot analyse has every
input cloned, a copy of each per call) and the output layouts. The GPU's architecture is taken as
sm_90, also by Triton's code generator for that analysis.
"""

import json
import sys

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import xclip_fast  # noqa: F401  (registers the operators)
from xclip_fast import library
from xclip_fast.kernels import plan

plan._device_arch = lambda index: 90
torch.cuda.current_device = lambda: 0


class _Sm90:
    """Triton's active driver as PyTorch's kernel analysis asks it: the target to generate IR for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Sm90())


def main() -> int:
    if library.OPAQUE:
        print(json.dumps({"error": "the operators are opaque custom_ops here (interpreter or XCLIP_FAST_OPAQUE_OPS)"}))
        return 1
    mode = FakeTensorMode()

    def fake(*shape, dtype=torch.bfloat16):
        return FakeTensor(mode, torch.empty(*shape, dtype=dtype, device="meta"), torch.device("cuda", 0))

    S, B, H, D = 197, 4, 12, 64
    qkv = fake(S, B, 3 * H * D).view(S, B, 3, H, D).transpose(0, 1)  # the modules' seq-first layout
    ekv = fake(B, 2, H, D)
    q, k, v, ek, ev = fake(B, S, H, D), fake(B, S, H, D), fake(B, S, H, D), fake(B, H, D), fake(B, H, D)
    x = fake(8, 3072)
    ops = torch.ops.xclip_fast
    grad = fake(B, S, H, D)

    def packed_bwd(qkv, ekv, grad):
        return ops.packed_attention_bwd(qkv, ekv, *ops.packed_attention_fwd(qkv, ekv, 0.125), grad, 0.125)

    def plain_bwd(q, k, v, grad):
        return ops.attention_bwd(q, k, v, None, None, *ops.attention_fwd(q, k, v, None, None, 0.125), grad, 0.125)

    mq, mk, mv, mgrad = (fake(32, 8, H, D) for _ in range(4))  # the message attention at T = 8: packed kernels

    cases = {  # name: (function, its fake CUDA arguments)
        "packed_attention_fwd": (lambda qkv, ekv: ops.packed_attention_fwd(qkv, ekv, 0.125), (qkv, ekv)),
        "packed_attention_bwd": (packed_bwd, (qkv, ekv, grad)),
        "attention_fwd": (lambda q, k, v, ek, ev: ops.attention_fwd(q, k, v, ek, ev, 0.125), (q, k, v, ek, ev)),
        "attention_bwd": (plain_bwd, (q, k, v, grad)),
        "attention_bwd-messages": (plain_bwd, (mq, mk, mv, mgrad)),
        "quick_gelu": (ops.quick_gelu, (x,)),
        "quick_gelu_backward": (ops.quick_gelu_backward, (x, x)),
    }
    status = 0
    for name, (fn, args) in cases.items():
        row = {"op": name}
        try:
            gm = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
            nodes = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
            row["kernels"] = len(nodes)
            row["clones"] = [sorted(n.kwargs.get("tensors_to_clone", [])) for n in nodes]
            with mode:
                out = fn(*args)
            out = out if isinstance(out, tuple) else (out,)
            row["layouts"] = [[list(t.shape), list(t.stride())] for t in out]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            status = 1
        print(json.dumps(row), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
