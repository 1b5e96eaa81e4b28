"""Every Triton kernel of xclip-fast once, on small shapes, each result checked: the workload that
``benchmarks/gpu_check.sh`` runs under ``compute-sanitizer --tool memcheck``.

Cases: the attention kernels (the sequence kernels' forward and one-launch backward in each of its
grids: key chunks split with the dq sum (few sequences x heads), one program per sequence x head, and
persistent programs taking several each; the packed kernels' forward, delta, dk/dv and dq passes),
through the plain entry (separate q, k, v; Sq != Sk too) and the packed
one (the modules' seq-first qkv buffer), with and without the extra token, at odd lengths that
give packed tiles (several short sequences per program) and ordinary ones, head dims 64 and 40
(masked columns); QuickGELU forward and backward on an odd element count; in bf16 and fp32 on CUDA,
fp16 on one shape (fp32 only under the CPU interpreter, whose bf16 dots are wrong).

Every output and gradient is compared with float64 on the CPU (``xclip_fast.testing.attention_f64``:
einsum and softmax, no SDPA), and so is PyTorch's own computation in the same dtype on the same
device (the torch backend: SDPA over the concatenated token, as a user without the kernels would
run it): the kernel may be at most 2x
that error in the forward and 3x in gradients (floored at the dtype's resolution). A memcheck
report names its kernel, so PyTorch's kernels running beside ours do not blur whose error it is.
Under the sanitizer ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` makes every tensor its own allocation, so
that an access past a tensor's end is caught.

    python tests/sanitize.py [--quick]             # one line per case, a verdict last; 1 on a mismatch
    python tests/sanitize.py --memcheck [--quick]  # the same under compute-sanitizer (1 on an error)
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from xclip_fast import mlp, ops, reference  # noqa: E402
from xclip_fast.testing import OWN_ERROR_FORWARD, OWN_ERROR_GRADIENT, attention_f64, rel_err  # noqa: E402

# the floor of "PyTorch's own error": a few units of the dtype's resolution (an exact PyTorch result
# does not oblige the kernel to be exact)
FLOOR = {torch.float32: 4 * torch.finfo(torch.float32).eps, torch.float16: 2 * torch.finfo(torch.float16).eps,
         torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}
QUICK_GELU = reference.QuickGELU()  # the formula, in whatever dtype it is given


def _leaves(tensors, device):
    return [t.detach().to(device).requires_grad_() if t is not None else None for t in tensors]


def _grads(out, inputs, grad_out):
    present = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, present, grad_out.to(out.device, out.dtype)))


def attention_case(layout, dtype, device, B, Sq, Sk, H, D, extra, gen):
    """(name, labels, kernel tensors, float64 tensors, PyTorch's own tensors) for one attention case:
    the output, then the gradient of every input."""
    if layout == "packed":  # the modules' buffer: (S, B, 3 H D) seq-first, viewed as (B, S, 3, H, D)
        qkv = torch.randn(Sq, B, 3 * H * D, generator=gen, dtype=torch.float64).to(dtype)
        ekv = torch.randn(B, 2, H, D, generator=gen, dtype=torch.float64).to(dtype) if extra else None
        grad_out = torch.randn(B, Sq, H, D, generator=gen, dtype=torch.float64)

        def run(impl, dev, cast):
            leaf_qkv, leaf_ekv = _leaves([qkv.to(cast), None if ekv is None else ekv.to(cast)], dev)
            view = leaf_qkv.view(Sq, B, 3, H, D).transpose(0, 1)
            q, k, v = view.unbind(2)
            ek, ev = leaf_ekv.unbind(1) if leaf_ekv is not None else (None, None)
            out = (attention_f64(q, k, v, ek, ev) if impl == "f64"
                   else ops.packed_attention(view, leaf_ekv, backend=impl))
            return [out, *_grads(out, [leaf_qkv, leaf_ekv], grad_out)]
    else:
        q = torch.randn(B, Sq, H, D, generator=gen, dtype=torch.float64).to(dtype)
        k, v = (torch.randn(B, Sk, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
        ek, ev = ((torch.randn(B, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2)) if extra
                  else (None, None))
        grad_out = torch.randn(B, Sq, H, D, generator=gen, dtype=torch.float64)

        def run(impl, dev, cast):
            leaves = _leaves([t if t is None else t.to(cast) for t in (q, k, v, ek, ev)], dev)
            out = attention_f64(*leaves) if impl == "f64" else ops.attention(*leaves, backend=impl)
            return [out, *_grads(out, leaves, grad_out)]

    kernel = run("triton", device, dtype)
    truth = run("f64", "cpu", torch.float64)
    own = run("torch", device, dtype)  # SDPA over the concatenated token
    lengths = f"S={Sq}" if layout == "packed" or Sq == Sk else f"Sq={Sq} Sk={Sk}"
    name = f"attention {layout:6s} {str(dtype)[6:]:8s} B={B} {lengths} H={H} D={D} extra={'yes' if extra else 'no'}"
    labels = ["out", "dqkv", "dextra_kv"] if layout == "packed" else ["out", "dq", "dk", "dv", "dextra_k", "dextra_v"]
    return name, labels, kernel, truth, own


def quick_gelu_case(dtype, device, n, gen):
    h = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)

    def run(fn, dev, cast):
        (leaf,) = _leaves([h.to(cast)], dev)
        out = fn(leaf)
        return [out, *_grads(out, [leaf], grad_out)]

    kernel = run(lambda x: mlp.quick_gelu(x, backend="triton"), device, dtype)
    return (f"quick_gelu         {str(dtype)[6:]:8s} n={n}", ["out", "dh"], kernel,
            run(QUICK_GELU, "cpu", torch.float64), run(QUICK_GELU, device, dtype))


def cases(device, quick: bool):
    """Every kernel, both entries, both extra-token settings, packed and tiled lengths: in bf16 and fp32
    (2- and 4-byte elements address memory differently), fp16 on the first shape (the same addressing
    as bf16); fp32 alone under the interpreter."""
    # (B, Sq, Sk, H, D): short odd lengths that pack several sequences per program (T = 7 and 1), a
    # longer odd one, Sq != Sk, and a head dim below its power-of-two block
    shapes = [(3, 7, 7, 2, 64), (2, 1, 1, 2, 64), (2, 37, 37, 2, 64), (2, 5, 9, 2, 64), (2, 13, 13, 3, 40)]
    if device.type == "cuda" and not quick:
        shapes.append((2, 197, 197, 2, 64))  # B/16's frame length: several query and key tiles
    if device.type == "cuda":
        # more sequences x heads than the backward's programs (at most 2 per SM): each program takes
        # several in turn, reusing its scratch (the shapes above are split or one program each)
        count = torch.cuda.get_device_properties(device).multi_processor_count
        shapes.append((2 * count + 3, 13, 13, 2, 64))
    runs = [(torch.float32, shapes)]
    if device.type == "cuda":
        runs = [(torch.bfloat16, shapes), (torch.float16, shapes[:1]), *runs]
    for dtype, dtype_shapes in runs:
        for B, Sq, Sk, H, D in dtype_shapes:
            for extra in (False, True):
                yield "attention", ("plain", dtype, device, B, Sq, Sk, H, D, extra)
                if Sq == Sk:
                    yield "attention", ("packed", dtype, device, B, Sq, Sk, H, D, extra)
        yield "quick_gelu", (dtype, device, 1001)


def workload(quick: bool) -> int:
    """Run every case, print one line each and a verdict; 0 when all are within their bounds."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ok, why = ops.triton_status(device)
    if not ok:
        print(f"the triton backend cannot run here: {why}")
        return 2
    gen = torch.Generator().manual_seed(0)
    failures = total = 0
    for kind, params in cases(device, quick):
        name, labels, kernel, truth, own = (attention_case if kind == "attention" else quick_gelu_case)(*params, gen)
        dtype = params[1] if kind == "attention" else params[0]
        # a gradient that is zero in exact arithmetic (dq with one key and no extra token: the
        # softmax is constant; float64 leaves it below 1e-9 of the largest) is rounding noise in both
        # computations: it is measured against the largest gradient's norm instead of its own
        largest = max(t.double().norm().item() for t in truth[1:])
        worst = []
        for i, (label, y, t, o) in enumerate(zip(labels, kernel, truth, own)):
            factor, s = (OWN_ERROR_FORWARD, 0.0) if i == 0 else (OWN_ERROR_GRADIENT, largest)
            err, bar = rel_err(y, t, s), factor * max(rel_err(o, t, s), FLOOR[dtype])
            worst.append((err / bar, err, bar, label))
        ratio, err, bar, which = max(worst)
        total += 1
        bad = ratio > 1
        failures += bad
        print(f"{'MISMATCH' if bad else 'ok      '} {name}: worst {which} {err:.2e} (allowed {bar:.2e})", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{total - failures}/{total} cases within their bounds on {device.type}"
          f"{'' if not failures else f'; {failures} MISMATCH'}", flush=True)
    return 1 if failures else 0


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    return found or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))), None)


def memcheck(quick: bool) -> int:
    """The workload under ``compute-sanitizer --tool memcheck``, each tensor its own allocation. Where
    the tool is missing or refuses the device (as it does under gVisor), the workload runs alone and
    the last line says that memcheck did not run, and why."""
    if not torch.cuda.is_available():
        rc = workload(quick)
        print("memcheck: NOT RUN (no CUDA device; the workload ran alone)")
        return rc
    tool = _sanitizer()
    reason = None if tool else "compute-sanitizer not found on PATH or under /usr/local/cuda*/bin"
    if tool:
        try:
            probe = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-c",
                                    "import torch; torch.ones(4, device='cuda').add_(1); torch.cuda.synchronize()"],
                                   capture_output=True, text=True, timeout=60)
            said = [line for line in (probe.stdout + probe.stderr).splitlines() if line.strip()]
            if probe.returncode != 0:
                reason = f"{tool} cannot check a trivial CUDA program here (rc={probe.returncode}): " + \
                    " | ".join(said[-3:])
        except subprocess.TimeoutExpired:
            reason = f"{tool} did not finish a trivial CUDA program within 60 s"
    if reason:
        rc = workload(quick)
        print(f"memcheck: NOT RUN ({reason}; the workload ran alone)")
        return rc
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20", sys.executable,
           os.path.abspath(__file__), *(["--quick"] if quick else [])]
    rc = subprocess.run(cmd, env=env).returncode
    verdict = {0: "no errors", 9: "ERRORS (the report is above)"}.get(rc, f"the workload exited with {rc}")
    print(f"memcheck ({tool}): {verdict}", flush=True)
    return 0 if rc == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the longest shape")
    parser.add_argument("--memcheck", action="store_true",
                        help="run the workload under compute-sanitizer's memcheck (CUDA); says so when it cannot")
    args = parser.parse_args(argv)
    return memcheck(args.quick) if args.memcheck else workload(args.quick)


if __name__ == "__main__":
    sys.exit(main())
