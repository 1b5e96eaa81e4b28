"""Compile the attention kernels ahead of time for NVIDIA GPUs, without a GPU.

Run as a script (never with TRITON_INTERPRET set): for a representative set of the launch choices
of ``kernels.attention.launch_plan`` it compiles each kernel for each requested architecture with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and prints one JSON line per
kernel: shared memory, whether the SASS holds tensor-core instructions, registers and spills.

    python tests/aot_compile.py 90 80
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from xclip_fast.kernels import attention as A
from xclip_fast.kernels import quick_gelu as Q

# (dtype, head dim, extra token, packed, tf32): each tile configuration of launch_plan and each
# flag combination appears at least once
CASES = [
    (torch.float16, 64, True, False, False),  # the X-CLIP frame attention
    (torch.bfloat16, 64, False, True, False),  # message attention, small T (packed)
    (torch.bfloat16, 128, True, False, False),
    (torch.float16, 40, False, False, False),  # padded head dim, long sequences
    (torch.float16, 16, False, True, False),
    (torch.float32, 64, True, False, False),  # exact fp32
    (torch.float32, 128, False, True, True),  # TF32
    (torch.float64, 128, True, False, False),  # the largest tiles in bytes
    (torch.float64, 32, False, False, False),
]
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
_INTS = {"B", "H", "SQ", "SK", "G", "N"}
_DIV16 = [["tt.divisibility", 16]]


def signature(fn, dtype, constexprs):
    """Argument types as the launchers pass them; pointers and strides 16-divisible (the usual JIT
    specialisation for real tensors), sizes unspecialised."""
    stat = "*fp64" if dtype == torch.float64 else "*fp32"
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("stride_"):
            sig[name], attrs[(i,)] = "i32", _DIV16
        elif name in _INTS:
            sig[name] = "i32"
        elif "scale" in name:
            sig[name] = "fp32"
        else:
            sig[name], attrs[(i,)] = (stat if name in ("lse", "delta") else _PTR[dtype]), _DIV16
    return sig, attrs


def _ptxas(arch):
    """The ptxas triton itself uses for ``arch`` (its PTX may need the newer of the bundled ones)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(arch).path
        except TypeError:  # older triton: no arch argument
            return get_ptxas().path
    except Exception:
        return _tool("ptxas")


def _tool(name):
    knob = getattr(triton.knobs.nvidia, name, None) if hasattr(triton, "knobs") else None
    if knob is not None and getattr(knob, "path", None):
        return knob.path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(job):
    kernel_name, dtype_name, head_dim, extra, packed, tf32, arch = job
    dtype = getattr(torch, dtype_name)
    sq = 8 if packed else 197
    plan = A.launch_plan(head_dim, dtype, sq, sq, extra, tf32)
    assert plan["constexprs"]["PACKED"] == packed
    fn = getattr(A, kernel_name, None) or getattr(Q, kernel_name)
    if kernel_name.startswith("_quick_gelu"):
        constexprs = dict(BLOCK=Q.BLOCK, ACC=Q._acc(dtype))
        options = dict(num_warps=4)
    elif kernel_name == "_attention_bwd_preprocess_kernel":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_D=plan["constexprs"]["BLOCK_D"],
                          ACC=plan["constexprs"]["ACC"])
        options = dict(num_warps=4)
    else:
        cfg = plan[{"_attention_fwd_kernel": "fwd", "_attention_bwd_dkdv_kernel": "dkdv",
                    "_attention_bwd_dq_kernel": "dq"}[kernel_name]]
        constexprs = dict(plan["constexprs"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sig, attrs = signature(fn, dtype, constexprs)
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    row = dict(kernel=kernel_name, dtype=dtype_name, head_dim=head_dim, extra=extra, packed=packed, tf32=tf32,
               arch=arch, shared=compiled.metadata.shared, num_warps=options["num_warps"])
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "o.cubin")],
                             capture_output=True, text=True).stderr
        regs = re.findall(r"Used (\d+) registers", log)
        spills = re.findall(r"(\d+) bytes spill stores", log)
        row["registers"] = int(regs[0]) if regs else None
        row["spill_bytes"] = int(spills[0]) if spills else None
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    row["tensor_core_ops"] = sorted(set(re.findall(r"\b(HGMMA|HMMA|DMMA|IMMA)\b", sass)))
    return row


def jobs(archs):
    kernels = ["_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"]
    for arch in archs:
        for dtype, d, extra, packed, tf32 in CASES:
            for k in kernels:
                yield (k, str(dtype).split(".")[1], d, extra, packed, tf32, arch)
        for dtype in (torch.float16, torch.float64):
            yield ("_attention_bwd_preprocess_kernel", str(dtype).split(".")[1], 128, False, False, False, arch)
        for k in ("_quick_gelu_fwd_kernel", "_quick_gelu_bwd_kernel"):
            for dtype in ("bfloat16", "float32"):
                yield (k, dtype, 64, False, False, False, arch)


def main(argv):
    archs = [int(a) for a in argv] or [90, 80]
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for row in pool.map(compile_one, list(jobs(archs))):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
