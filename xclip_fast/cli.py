"""The ``xclip-fast`` command.

    xclip-fast check     the fast block against the reference on random data (errors per tensor)
    xclip-fast bench     speed and peak memory against the reference and other attention paths
"""

from __future__ import annotations

import argparse
import sys

import torch

from xclip_fast.testing import TOLERANCES, rel_err

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _check(args) -> int:
    from xclip_fast import reference
    from xclip_fast.blocks import CrossFrameAttentionBlock
    from xclip_fast.ops import triton_status

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    backends = args.backends.split(",") if args.backends else ["torch", "triton"]
    torch.manual_seed(args.seed)
    l, b, T, d, H = args.tokens, args.batch, args.frames, args.width, args.heads
    ref = reference.CrossFramelAttentionBlock(d, H, T=T).to(device=device, dtype=dtype)
    x = torch.randn(l, b * T, d, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(grad)
    tol = TOLERANCES[dtype]
    print(f"device {device}, dtype {args.dtype}, l={l} b={b} T={T} d={d} heads={H}; tolerance {tol:g} "
          f"(relative error against the reference computed in the same dtype)")
    failed = False
    for backend in backends:
        if backend == "triton":
            ok, why = triton_status(device)
            if not ok:
                print(f"  {backend:8s} skipped: {why}")
                continue
        block = CrossFrameAttentionBlock(d, H, T=T, backend=backend).to(device=device, dtype=dtype)
        block.load_state_dict(ref.state_dict())
        xf = x.clone().requires_grad_()
        y = block(xf)
        y.backward(grad)
        errors = {"output": rel_err(y, yr), "grad x": rel_err(xf.grad, xr.grad)}
        ref_params = dict(ref.named_parameters())
        for name, p in block.named_parameters():
            errors[f"grad {name}"] = rel_err(p.grad, ref_params[name].grad)
        worst = max(errors, key=errors.get)
        status = "ok" if errors[worst] <= tol else "FAIL"
        failed |= status == "FAIL"
        print(f"  {backend:8s} {status}: output {errors['output']:.2e}, grad x {errors['grad x']:.2e}, "
              f"worst {worst} {errors[worst]:.2e} ({len(errors)} tensors)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xclip-fast", description="Fast, lean X-CLIP video encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="compare the fast block with the reference on random data")
    check.add_argument("--backends", default=None, help="comma list of torch,triton (default: both)")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.add_argument("--dtype", default="float64", choices=sorted(_DTYPES))
    check.add_argument("--tokens", type=int, default=50, help="tokens per frame l (default 50)")
    check.add_argument("--batch", type=int, default=2, help="videos b (default 2)")
    check.add_argument("--frames", type=int, default=8, help="frames per video T (default 8)")
    check.add_argument("--width", type=int, default=128, help="width d (default 128)")
    check.add_argument("--heads", type=int, default=2, help="heads (default 2)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_check)

    from xclip_fast import bench

    bench_parser = sub.add_parser("bench", help="speed and peak memory against the reference, torch.compile, "
                                  "SDPA and xformers (table, CSV/JSON, plot)")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
