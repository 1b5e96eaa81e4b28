"""Compile the attention kernels ahead of time for NVIDIA GPUs, without a GPU.

Run as a script (never with TRITON_INTERPRET set): for a representative set of the launch choices
of ``kernels.attention.launch_plan`` it compiles each kernel for each requested architecture with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and prints one JSON line per
kernel: shared memory, whether the SASS holds tensor-core instructions, registers and spills.

    python tests/aot_compile.py 90 80
    python tests/aot_compile.py --table triton-3.6.0.jsonl triton-3.9.0.jsonl > table.md
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
# and each flag combination appears at least once. Packed cases compile the packed kernels, the others
# the sequence kernels. The softmax scale arrives as fp32 scalars from
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
# kernel name as reported -> (the jit function, its launch-plan tiles, extra constexprs); the sequence
# backward's variant that leaves dq partials (key chunks split) is reported under its own key
KERNELS = {
    "_sequence_fwd_kernel": ("_sequence_fwd_kernel", "fwd", {}),
    "_sequence_bwd_kernel": ("_sequence_bwd_kernel", "bwd", {"PARTIAL": False}),
    "_sequence_bwd_kernel/partial": ("_sequence_bwd_kernel", "bwd", {"PARTIAL": True}),
    "_packed_fwd_kernel": ("_packed_fwd_kernel", "packed_fwd", {}),
    "_packed_bwd_kernel_dkdv": ("_packed_bwd_kernel", "packed_dkdv", {"DKDV": True}),
    "_packed_bwd_kernel_dq": ("_packed_bwd_kernel", "packed_dq", {"DKDV": False}),
}
SEQUENCE_KERNELS = ("_sequence_fwd_kernel", "_sequence_bwd_kernel", "_sequence_bwd_kernel/partial")
PACKED_KERNELS = ("_packed_fwd_kernel", "_packed_bwd_kernel_dkdv", "_packed_bwd_kernel_dq")
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
_INTS = {"B", "H", "SQ", "SK", "G", "N", "M_TILES", "ITEMS", "SPLIT", "SPLIT_KEYS", "SQP"}
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
            stat_ptr = name in ("lse", "delta", "work_dq", "work_delta")  # accumulator-dtype buffers
            sig[name], attrs[(i,)] = (stat if stat_ptr else _PTR[dtype]), _DIV16
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
    """Compile one kernel launch choice ``(kernel, dtype, head dim, extra, packed, tf32, scale type, arch,
    tiles)`` and report shared memory, registers, spills and what the SASS holds: the tensor-core
    instruction kinds, how many matrix instructions, how many wgmma waits (``WARPGROUP.DEPBAR``) and
    block barriers."""
    kernel_name, dtype_name, head_dim, extra, packed, tf32, scale_type, arch, tiles = job
    dtype = getattr(torch, dtype_name)
    sq = 8 if packed else 197
    plan = P.launch_plan(head_dim, dtype, extra, tf32, arch)
    if tiles is not None:  # a candidate of the tuning sweep instead of the default tiles
        plan = dataclasses.replace(plan, **{k: P.Tiles(*v) for k, v in tiles.items() if k in P.KERNELS})
    assert (P.pack_group(plan, sq, sq) > 1) == packed
    fn_name, plan_field, flags = KERNELS.get(kernel_name, (kernel_name, None, {}))
    if kernel_name in SEQUENCE_KERNELS:
        flags = dict(flags, HAS_EXTRA=extra, **({} if kernel_name == "_sequence_fwd_kernel" else {"DQ_T": plan.dq_t}))
    fn = getattr(A, fn_name, None) or getattr(Q, fn_name)
    if kernel_name.startswith("_quick_gelu"):
        constexprs = dict(BLOCK=P.QUICK_GELU_DEFAULT[0], ACC=tl_dtype(acc_dtype(dtype)))
        options = dict(num_warps=P.QUICK_GELU_DEFAULT[1])
        if tiles is not None:
            constexprs["BLOCK"], options["num_warps"] = tiles["quick_gelu"]
    elif kernel_name == "_packed_bwd_delta_kernel":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=plan.packed_delta.block_m, BLOCK_D=plan.block_d, ACC=plan.acc)
        options = dict(num_warps=plan.packed_delta.num_warps)
    elif kernel_name == "_sequence_dq_sum_kernel":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=plan.bwd.block_m, BLOCK_D=plan.block_d, ACC=plan.acc,
                          DQ_T=plan.dq_t)
        options = dict(num_warps=4)
    else:
        t = getattr(plan, plan_field)
        constexprs = dict(plan.constexprs(), BLOCK_M=t.block_m, BLOCK_N=t.block_n, **flags)
        options = dict(num_warps=t.num_warps, num_stages=t.num_stages)
    sig, attrs = signature(fn, dtype, constexprs, scale_type)
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    row = dict(kernel=kernel_name, name=compiled.metadata.name,
               block=[constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N")], stages=options.get("num_stages"),
               dtype=dtype_name, head_dim=head_dim, extra=extra,
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
    row["mma_instructions"] = len(re.findall(r"\b(?:HGMMA|HMMA|DMMA)\.", sass))
    row["mma_shapes"] = sorted(set(re.findall(r"\b(?:HGMMA|HMMA|DMMA)\.(\d+x\d+x\d+)", sass)))
    row["wgmma_waits"] = len(re.findall(r"\bWARPGROUP\.DEPBAR", sass))
    row["barriers"] = len(re.findall(r"\bBAR\.SYNC", sass))
    return row


def jobs(archs):
    for arch in archs:
        for dtype, d, extra, packed, tf32, scale_type in CASES:
            for k in PACKED_KERNELS if packed else SEQUENCE_KERNELS:
                yield (k, str(dtype).split(".")[1], d, extra, packed, tf32, scale_type, arch, None)
        for dtype in (torch.float16, torch.float64):
            for k in ("_packed_bwd_delta_kernel", "_sequence_dq_sum_kernel"):
                yield (k, str(dtype).split(".")[1], 128, False, False, False, "fp32", arch, None)
        for k in ("_quick_gelu_fwd_kernel", "_quick_gelu_bwd_kernel"):
            for dtype in ("bfloat16", "float32"):
                yield (k, dtype, 64, False, False, False, "fp32", arch, None)


def table(paths) -> str:
    """A Markdown table of compile reports (one JSON-lines file per triton release, named
    ``triton-<version>.jsonl``) side by side: registers, spilled bytes, shared memory, the matrix
    instructions and the wgmma waits of each kernel launch choice."""
    runs = []
    for path in paths:
        version = os.path.basename(path).removeprefix("triton-").removesuffix(".jsonl")
        with open(path) as f:
            runs.append((version, [json.loads(line) for line in f if line.startswith("{")]))
    key = ("kernel", "dtype", "head_dim", "extra", "packed", "tf32", "scale_type", "arch")
    per_run = [{tuple(r[k] for k in key): r for r in rows} for _, rows in runs]
    head = ["kernel", "dtype", "D", "extra", "packed", "tf32", "scale", "sm", "tiles"]
    for version, _ in runs:
        head += [f"{version} regs", f"{version} spill B", f"{version} smem", f"{version} MMA (waits)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, first in per_run[0].items():
        tiles = "" if first.get("block") is None or first["block"][0] is None else \
            f"{first['block'][0]}x{first['block'][1] or '-'} w{first['num_warps']} s{first.get('stages') or '-'}"
        cells = [first["kernel"], first["dtype"], str(first["head_dim"]), "y" if first["extra"] else "",
                 "y" if first["packed"] else "", "y" if first["tf32"] else "", first["scale_type"], str(first["arch"]),
                 tiles]
        for run in per_run:
            r = run.get(k)
            if r is None:
                cells += ["-"] * 4
                continue
            mma = ",".join(r["tensor_core_ops"]) or "-"
            if r.get("mma_shapes"):
                mma += f" {'/'.join(r['mma_shapes'])}"
            waits = r.get("wgmma_waits", "-")
            cells += [str(r["registers"]), str(r["spill_bytes"]), str(r["shared"]), f"{mma} ({waits})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    if argv[:1] == ["--table"]:
        sys.stdout.write(table(argv[1:]))
        return
    archs = [int(a) for a in argv] or [90, 80]
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for row in pool.map(compile_one, list(jobs(archs))):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
