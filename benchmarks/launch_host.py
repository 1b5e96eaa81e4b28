"""The host's time of one block step on the triton backend, our kernels' launches replaced by no-ops.

    python benchmarks/launch_host.py [--checkout PATH] [--against OLDER_CHECKOUT] [--out DIR]

On a GPU the host issues every kernel; when it takes longer than the GPU needs, the GPU waits. This times
what our Python costs around the kernels (the block's dataflow, the operators or their direct calls, the
launchers' arguments), without the kernels and without Triton's own launch (the kernels are replaced by
objects whose launch does nothing), on a CPU under Triton's interpreter mode, one thread, tiny sizes
(d = 64, 2 heads, T = 2, l = 5), so that the arithmetic is negligible. Per recompute level: a training step
(forward + backward) and an inference forward, the median over fresh processes of the median of 7 rounds of
100 calls. ``--against``: another checkout (an older commit, ``git worktree add``), measured in alternation
with this one in the same run, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LEVELS = ("none", "lean", "min", "block")


class InterpretedFunction:
    """A kernel whose launch does nothing (named so that every version of ``wrap_triton`` launches it as it is)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def measure(rounds: int) -> dict:
    import torch

    import xclip_fast.kernels.attention as A
    import xclip_fast.kernels.quick_gelu as Q
    from xclip_fast.blocks import CrossFrameAttentionBlock

    torch.set_num_threads(1)
    for module in (A, Q):  # every jit kernel of the two modules (their names differ between checkouts)
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            setattr(module, name, InterpretedFunction())
    torch.manual_seed(0)
    x = torch.randn(5, 4, 64)
    g = torch.randn_like(x)
    out = {}
    for level in LEVELS:
        block = CrossFrameAttentionBlock(64, 2, T=2, backend="triton", recompute=level)
        xi = x.clone().requires_grad_()

        def train(block=block, xi=xi):
            block(xi).backward(g)

        def infer(block=block):
            with torch.no_grad():
                block(x)
        for name, fn in (("train", train), ("infer", infer)):
            for _ in range(30):
                fn()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(100):
                    fn()
                times.append((time.perf_counter() - t0) / 100 * 1e3)
            out[f"{level} {name}"] = statistics.median(times)
    return out


def _child(checkout: Path, rounds: int) -> dict:
    """One measurement in a fresh process (the interpreter mode and the checkout set before any import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(checkout), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds)], env=env,
                          capture_output=True, text=True, cwd=checkout)
    if proc.returncode:
        raise RuntimeError(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _commit(checkout: Path) -> str:
    """The checkout's commit, ``+changes`` when its tracked files differ from it."""
    def git(*cmd):
        return subprocess.run(["git", "-C", str(checkout), *cmd], capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", default=None, help="the repository checkout to measure (default: this one)")
    p.add_argument("--against", default=None, help="another checkout, measured in alternation with it")
    p.add_argument("--processes", type=int, default=3, help="fresh processes per checkout (median over them)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rounds)))
        return 0
    checkouts = [Path(args.checkout or Path(__file__).resolve().parents[1]).resolve()]
    if args.against:
        checkouts.insert(0, Path(args.against).resolve())
    runs: dict = {c: [] for c in checkouts}
    for _ in range(args.processes):  # alternating, so that drifts of the machine reach both alike
        for c in checkouts:
            runs[c].append(_child(c, args.rounds))
    cells = [f"{level} {mode}" for level in LEVELS for mode in ("train", "infer")]
    ms = {c: {cell: statistics.median(r[cell] for r in runs[c]) for cell in cells} for c in checkouts}
    names = [_commit(c) for c in checkouts]
    lines = [f"host ms per call, our kernels' launches replaced by no-ops (median of {args.processes} processes "
             f"x {args.rounds} rounds x 100 calls; one thread)", "",
             "| level | step | " + " | ".join(names) + (" | after / before |" if args.against else " |"),
             "|---|---|" + "---|" * (len(checkouts) + bool(args.against))]
    for cell in cells:
        values = [ms[c][cell] for c in checkouts]
        ratio = f" {values[1] / values[0]:.2f} |" if args.against else ""
        lines.append(f"| {cell.split()[0]} | {cell.split()[1]} | " + " | ".join(f"{v:.3f}" for v in values)
                     + " |" + ratio)
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        doc = {"checkouts": {_commit(c): {"runs": runs[c], "median_ms": ms[c]} for c in checkouts}}
        (Path(args.out) / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (Path(args.out) / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
