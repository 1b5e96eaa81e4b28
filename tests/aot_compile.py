"""Compile the attention kernels ahead of time for NVIDIA GPUs, without a GPU.

Run as a script (never with TRITON_INTERPRET set): for a representative set of the launch choices
of ``kernels.attention.launch_plan`` it compiles each kernel for each requested architecture with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and prints one JSON line per
kernel: shared memory, whether the SASS holds tensor-core instructions, registers and spills.

    python tests/aot_compile.py 90 80
"""

import dataclasses
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

from xclip_fast.kernels import acc_dtype, tl_dtype
from xclip_fast.kernels import attention as A
from xclip_fast.kernels import plan as P
from xclip_fast.kernels import quick_gelu as Q

# (dtype, head dim, extra token, packed, tf32, scale type): each tile configuration of launch_plan
# and each flag combination appears at least once. The softmax scale arrives as fp32 scalars from
# the launchers; under Inductor it may arrive as fp64, which the kernels must accept unchanged.
CASES = [
    (torch.float16, 64, True, False, False, "fp32"),  # the X-CLIP frame attention
    (torch.bfloat16, 64, False, True, False, "fp32"),  # message attention, small T (packed)
    (torch.bfloat16, 128, True, False, False, "fp32"),
    (torch.float16, 40, False, False, False, "fp32"),  # padded head dim, long sequences
    (torch.float16, 16, False, True, False, "fp32"),
    (torch.float32, 64, True, False, False, "fp32"),  # exact fp32
    (torch.float32, 128, False, True, True, "fp32"),  # TF32
    (torch.float64, 128, True, False, False, "fp32"),  # the largest tiles in bytes
    (torch.float64, 32, False, False, False, "fp32"),
    (torch.bfloat16, 64, True, False, False, "fp64"),  # the scale as fp64 scalars (Inductor)
    (torch.float32, 64, False, True, False, "fp64"),
    (torch.float64, 64, True, False, False, "fp64"),
]
# kernel name as reported -> (the jit function, its launch-plan tiles, extra constexprs)
KERNELS = {
    "_attention_fwd_kernel": ("_attention_fwd_kernel", "fwd", {}),
    "_attention_bwd_dkdv": ("_attention_bwd_kernel", "dkdv", {"DKDV": True}),
    "_attention_bwd_dq": ("_attention_bwd_kernel", "dq", {"DKDV": False}),
}
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
_INTS = {"B", "H", "SQ", "SK", "G", "N"}
_DIV16 = [["tt.divisibility", 16]]


def signature(fn, dtype, constexprs, scale_type="fp32"):
    """Argument types as the launchers pass them; pointers and strides 16-divisible (the usual JIT
    specialisation for real tensors), sizes unspecialised, the softmax scale as ``scale_type``."""
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
            sig[name] = scale_type
        else:
            sig[name], attrs[(i,)] = (stat if name in ("lse", "delta") else _PTR[dtype]), _DIV16
    return sig, attrs


def _ptxas(arch):
    """The ptxas triton itself uses for ``arch`` (its PTX may need the newer of the bundled ones)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        return _tool("ptxas")


def _tool(name):
    knob = getattr(triton.knobs.nvidia, name, None) if hasattr(triton, "knobs") else None
    if knob is not None and getattr(knob, "path", None):
        return knob.path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(job):
    kernel_name, dtype_name, head_dim, extra, packed, tf32, scale_type, arch, tiles = job
    dtype = getattr(torch, dtype_name)
    sq = 8 if packed else 197
    plan = P.launch_plan(head_dim, dtype, extra, tf32)
    if tiles is not None:  # a candidate of the tuning sweep instead of the default tiles
        plan = dataclasses.replace(plan, **{k: P.Tiles(*v) for k, v in tiles.items() if k in P.KERNELS})
    assert (P.pack_group(plan, sq, sq) > 1) == packed
    fn_name, plan_field, flags = KERNELS.get(kernel_name, (kernel_name, None, {}))
    fn = getattr(A, fn_name, None) or getattr(Q, fn_name)
    if kernel_name.startswith("_quick_gelu"):
        constexprs = dict(BLOCK=P.QUICK_GELU_DEFAULT[0], ACC=tl_dtype(acc_dtype(dtype)))
        options = dict(num_warps=P.QUICK_GELU_DEFAULT[1])
        if tiles is not None:
            constexprs["BLOCK"], options["num_warps"] = tiles["quick_gelu"]
    elif kernel_name == "_attention_bwd_preprocess_kernel":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=plan.preprocess.block_m, BLOCK_D=plan.block_d, ACC=plan.acc)
        options = dict(num_warps=plan.preprocess.num_warps)
    else:
        t = getattr(plan, plan_field)
        constexprs = dict(plan.constexprs(packed), BLOCK_M=t.block_m, BLOCK_N=t.block_n, **flags)
        options = dict(num_warps=t.num_warps, num_stages=t.num_stages)
    sig, attrs = signature(fn, dtype, constexprs, scale_type)
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    row = dict(kernel=kernel_name, name=compiled.metadata.name, dtype=dtype_name, head_dim=head_dim, extra=extra,
               packed=packed, tf32=tf32,
               scale_type=scale_type, arch=arch, shared=compiled.metadata.shared, num_warps=options["num_warps"],
               tiles=tiles)
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
    for arch in archs:
        for dtype, d, extra, packed, tf32, scale_type in CASES:
            for k in KERNELS:
                yield (k, str(dtype).split(".")[1], d, extra, packed, tf32, scale_type, arch, None)
        for dtype in (torch.float16, torch.float64):
            yield ("_attention_bwd_preprocess_kernel", str(dtype).split(".")[1], 128, False, False, False, "fp32",
                   arch, None)
        for k in ("_quick_gelu_fwd_kernel", "_quick_gelu_bwd_kernel"):
            for dtype in ("bfloat16", "float32"):
                yield (k, dtype, 64, False, False, False, "fp32", arch, None)


def main(argv):
    archs = [int(a) for a in argv] or [90, 80]
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for row in pool.map(compile_one, list(jobs(archs))):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
