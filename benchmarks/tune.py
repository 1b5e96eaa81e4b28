"""Tile tuning of the Triton kernels at the X-CLIP shapes; writes the table launch_plan reads.

    python benchmarks/tune.py --prune                  # on any machine: AOT-compile the candidates for
                                                       # sm_90, keep those with no spills that fit in
                                                       # shared memory -> benchmarks/tune_candidates.json
    python benchmarks/tune.py --out DIR [--budget S]   # on a GPU: time the kept candidates, write
                                                       # DIR/tuned.json, DIR/tune.csv, print a table
    python benchmarks/tune.py --dry-run --out DIR      # anywhere: walk every step on tiny shapes

For each dtype (bf16, fp16) and shape (frame attention with the message token at l = 50, 197, 257;
message attention at T = 8, 32, 1024; head dim 64) each kernel the shape runs is timed over its
candidate tiles, launched alone: the sequence kernels' forward and one-launch backward (then the
backward's persistent programs per SM), or the packed kernels' forward, dk/dv pass and dq pass (their
delta pass, which has no tiles to choose, on a row of its own); and QuickGELU's forward and backward
apart over their (elements per program, warps) candidates. Times are GPU time by CUDA-graph replay, no Python in
the timed region, with the host's time per launch in a column of its own
(``xclip_fast/bench/gputime.py``). Each winner is checked against the default tiles' result
before it is kept. Winners go to ``tuned.json`` keyed by
(GPU architecture, dtype, head dim, extra token, sequence bucket); copy it to ``xclip_fast/kernels/tuned.json``
to commit it. ``--budget`` stops timing new shapes when the time is spent (what is done is written).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CANDIDATES = HERE / "tune_candidates.json"
SHARED_LIMIT_SM90 = 227 * 1024

# (name, kind, SQ=SK, batch B, heads H): frame attention over N = 256 frames of 12 heads; the message
# attention over 256 frames' worth of videos (B = 256 // T)
SHAPES = [
    ("frames-l197", "frames", 197, 256, 12),
    ("frames-l50", "frames", 50, 256, 12),
    ("frames-l257", "frames", 257, 256, 16),
    ("messages-T8", "messages", 8, 32, 12),
    ("messages-T32", "messages", 32, 8, 12),
    ("messages-T1024", "messages", 1024, 2, 12),
]
HEAD_DIM = 64
DTYPES = ("bfloat16", "float16")
# [BLOCK_M, BLOCK_N, num_warps, num_stages] per kernel; pruned by --prune
RAW_CANDIDATES = {
    "fwd": [[64, 64, 4, 2], [64, 64, 4, 3], [128, 64, 8, 2], [128, 64, 8, 3], [64, 128, 8, 2], [128, 128, 8, 2],
            [64, 32, 4, 3], [32, 64, 4, 3]],
    "bwd": [[32, 64, 4, 2], [32, 64, 4, 1], [64, 64, 8, 2], [32, 128, 8, 2], [16, 64, 4, 2], [16, 128, 8, 2],
            [64, 32, 4, 2]],
    "packed_fwd": [[64, 64, 4, 2], [64, 64, 4, 3], [128, 64, 8, 2], [128, 64, 8, 3], [64, 32, 4, 3],
                   [128, 32, 8, 2], [128, 128, 8, 2]],
    "packed_dkdv": [[32, 64, 4, 2], [32, 64, 4, 3], [64, 64, 4, 2], [64, 64, 8, 2], [16, 64, 4, 2], [32, 128, 8, 2],
                    [64, 128, 8, 2]],
    "packed_dq": [[64, 64, 4, 2], [64, 64, 4, 3], [128, 64, 8, 2], [64, 32, 4, 2], [128, 32, 8, 2], [64, 128, 8, 2]],
}
BWD_PER_SM = (1, 2, 3, 4)  # the sequence backward's persistent programs per SM, tried after its tiles
QUICK_GELU_CANDIDATES = [[1024, 4], [2048, 4], [2048, 8], [4096, 8], [8192, 8]]
VARIANTS = {"frames": dict(extra=True, packed=False), "messages-packed": dict(extra=False, packed=True),
            "messages": dict(extra=False, packed=False)}
# the tuned kernels of each variant (the packed delta pass has nothing to tune)
VARIANT_KERNELS = {"frames": ("fwd", "bwd"), "messages": ("fwd", "bwd"),
                   "messages-packed": ("packed_fwd", "packed_dkdv", "packed_dq")}
_AOT_KERNEL = {"fwd": "_sequence_fwd_kernel", "bwd": "_sequence_bwd_kernel", "packed_fwd": "_packed_fwd_kernel",
               "packed_dkdv": "_packed_bwd_kernel_dkdv", "packed_dq": "_packed_bwd_kernel_dq"}


def _variant(kind: str, seq: int) -> str:
    return "frames" if kind == "frames" else ("messages-packed" if 2 * seq <= 64 else "messages")


# ------------------------------------------------------------------------------------------------
# pruning (no GPU needed)
# ------------------------------------------------------------------------------------------------
def prune(out_path: Path) -> dict:
    """Compile every candidate for sm_90 (tests/aot_compile.py) and keep those with no register spills
    whose shared memory fits; written to ``out_path`` with the compile reports."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from concurrent.futures import ProcessPoolExecutor


    jobs = []
    for dtype in DTYPES:
        for variant, flags in VARIANTS.items():
            for kernel in VARIANT_KERNELS[variant]:
                for cand in RAW_CANDIDATES[kernel]:
                    jobs.append((_AOT_KERNEL[kernel], dtype, HEAD_DIM, flags["extra"], flags["packed"], False, "fp32",
                                 90, {kernel: cand}))
        for cand in QUICK_GELU_CANDIDATES:
            jobs.append(("_quick_gelu_fwd_kernel", dtype, HEAD_DIM, False, False, False, "fp32", 90,
                         {"quick_gelu": cand}))
    kept, reports = {}, []
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for job, row in zip(jobs, pool.map(_compile_or_fail, jobs)):
            kernel, dtype, _, extra, packed = job[0], job[1], job[2], job[3], job[4]
            (which, cand), = job[8].items()
            variant = "quick_gelu" if which == "quick_gelu" else next(
                v for v, f in VARIANTS.items() if f == dict(extra=extra, packed=packed))
            ok = row.get("error") is None and not row.get("spill_bytes") and row["shared"] <= SHARED_LIMIT_SM90
            reports.append({"dtype": dtype, "variant": variant, "kernel": which, "tiles": cand, "kept": ok,
                            **{k: row.get(k) for k in ("shared", "registers", "spill_bytes", "error")}})
            if ok:
                kept.setdefault(dtype, {}).setdefault(variant, {}).setdefault(which, []).append(cand)
    result = {"arch": 90, "head_dim": HEAD_DIM, "shared_limit": SHARED_LIMIT_SM90, "candidates": kept,
              "reports": reports}
    out_path.write_text(json.dumps(result, indent=1))
    return result


def _compile_or_fail(job):
    import aot_compile

    try:
        return aot_compile.compile_one(job)
    except Exception as exc:  # a candidate the compiler rejects is simply not kept
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
                "shared": 0}


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _timer(device, dry_run: bool):
    """GPU time by CUDA-graph replay with the host time apart (xclip_fast.bench.gputime); on a dry
    run, one round of CPU wall time (the interpreter is slow)."""
    from xclip_fast.bench.gputime import CPUTimer, GraphTimer

    return CPUTimer(rounds=1) if dry_run or device.type != "cuda" else GraphTimer(device)


def _row(label, kernel, tiles, timing, note=""):
    return dict(**label, kernel=kernel, tiles=tiles, ms=f"{timing.ms:.4f}",
                host_ms="" if timing.host_ms is None else f"{timing.host_ms:.4f}", timing=timing.how, note=note)


def _time(timer, problems, kernel, plan):
    """One kernel alone, on each input set in turn (see xclip_fast.bench.gputime.rotation)."""
    return timer.measure([lambda p=p: p.launch(kernel, plan) for p in problems])


def _tune_shape(problems, base, pool, timer, dry_run, label):
    """The best tiles of each tuned kernel of one problem, each kernel timed alone (the packed delta
    pass, which has no tiles to choose, on a row of its own; the sequence backward's programs per SM
    after its tiles): (rows, {kernel: ms at its best}, {plan field: best value} or None if the tuned
    tiles change the results)."""
    from xclip_fast.kernels.plan import Tiles, pack_group
    from xclip_fast.testing import rel_err

    rows, best, best_ms = [], {}, {}
    kernels = problems[0].kernels(base)
    seq = problems[0].shape[1]
    packed = pack_group(base, seq, seq) > 1
    reference = problems[0].results(base)
    for p in problems:
        p.prepare(base)
    if "packed_delta" in kernels:
        t = _time(timer, problems, "packed_delta", base)
        best_ms["packed_delta"] = t.ms
        rows.append(_row(label, "packed_delta", list(dataclasses.astuple(base.packed_delta)), t, note="not tuned"))
    for kernel in (k for k in kernels if k != "packed_delta"):
        options = [list(dataclasses.astuple(getattr(base, kernel)))]
        options += [c for c in pool.get(kernel, []) if c not in options]
        timings = []
        for cand in options[:2] if dry_run else options:
            plan = dataclasses.replace(base, **{**best, kernel: Tiles(*cand)})
            if (pack_group(plan, seq, seq) > 1) != packed:  # these tiles would run the other kernels
                continue
            try:
                t = _time(timer, problems, kernel, plan)
            except Exception as exc:  # e.g. out of resources on this GPU
                rows.append(dict(**label, kernel=kernel, tiles=cand, ms="", host_ms="", timing="",
                                 note=type(exc).__name__))
                continue
            timings.append((t.ms, cand, t))
            rows.append(_row(label, kernel, cand, t))
        ms, cand, t = min(timings, key=lambda x: x[0])
        best[kernel], best_ms[kernel] = Tiles(*cand), ms
        rows.append(_row(label, kernel, cand, t, note=f"winner ({timings[0][0] / ms:.2f}x the default)"))
    if "bwd" in kernels:
        timings = []
        for per_sm in BWD_PER_SM[:2] if dry_run else BWD_PER_SM:
            plan = dataclasses.replace(base, **best, bwd_per_sm=per_sm)
            t = _time(timer, problems, "bwd", plan)
            timings.append((t.ms, per_sm, t))
            rows.append(_row(label, "bwd", [*dataclasses.astuple(best["bwd"]), f"{per_sm}/SM"], t))
        ms, per_sm, t = min(timings, key=lambda x: x[0])
        best["bwd_per_sm"], best_ms["bwd"] = per_sm, ms
        rows.append(_row(label, "bwd", [*dataclasses.astuple(best["bwd"]), f"{per_sm}/SM"], t,
                         note="winner (programs per SM)"))
    tuned = problems[0].results(dataclasses.replace(base, **best))
    tol = 1e-5 if problems[0].q.dtype.itemsize >= 4 else 2e-2  # two roundings of the output dtype
    for what, a, b in zip(("out", "dq", "dk", "dv"), tuned, reference):
        err = rel_err(a, b)
        if not err <= tol:
            print(f"{label}: the tuned tiles change {what} by {err:.2e} > {tol}: not kept", file=sys.stderr)
            return rows, best_ms, None
    return rows, best_ms, best


def _tune_quick_gelu(n, dtype, device, pool, timer, dry_run, label):
    """The (elements per program, warps) of the QuickGELU kernels, forward and backward each timed
    alone; the winner is the fastest pair."""
    from xclip_fast.bench.kernels import QuickGELUProblem
    from xclip_fast.kernels import plan as P

    problem = QuickGELUProblem(n, dtype, device)
    options = [list(P.QUICK_GELU_DEFAULT)] + [c for c in pool if c != list(P.QUICK_GELU_DEFAULT)]
    rows, timings = [], []
    for cand in options[:2] if dry_run else options:
        ts = {k: timer.measure([lambda k=k, c=cand: problem.launch(k, tuple(c))])
              for k in ("quick_gelu_fwd", "quick_gelu_bwd")}
        timings.append((sum(t.ms for t in ts.values()), cand, ts))
        rows += [_row(label, k, cand, t) for k, t in ts.items()]
    total, cand, ts = min(timings, key=lambda x: x[0])
    rows += [_row(label, k, cand, t, note=f"winner ({timings[0][0] / total:.2f}x the default, fwd + bwd)")
             for k, t in ts.items()]
    return rows, cand, {k: t.ms for k, t in ts.items()}


def tune(out_dir: Path, budget: float, dry_run: bool, timer=None) -> int:
    """Time every candidate (``timer``: default :func:`_timer`'s) and write the table and the CSV."""
    import torch

    from xclip_fast.bench.kernels import problems as kernel_problems
    from xclip_fast.kernels.plan import launch_plan, seq_bucket

    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not dry_run:
        print("tune.py needs a CUDA GPU to time kernels (use --dry-run to walk the steps on CPU)", file=sys.stderr)
        return 2
    cands = json.loads(CANDIDATES.read_text())["candidates"]
    major, minor = torch.cuda.get_device_capability() if cuda else (9, 0)
    arch, device_name = 10 * major + minor, torch.cuda.get_device_name() if cuda else "dry run (CPU interpreter)"
    timer = timer or _timer(device, dry_run)
    shapes = SHAPES if not dry_run else [("frames-dry", "frames", 9, 2, 1), ("messages-dry", "messages", 5, 3, 1)]
    head_dim = HEAD_DIM if not dry_run else 16
    date = time.strftime("%Y-%m-%d")
    start = time.perf_counter()
    rows, entries = [], []
    for dtype_name in DTYPES if not dry_run else ("float32",):
        dtype = getattr(torch, dtype_name)
        pools = cands.get(dtype_name if not dry_run else "bfloat16", {})
        for name, kind, seq, B, H in shapes:
            if time.perf_counter() - start > budget:
                print(f"budget of {budget:.0f}s spent: stopping before {dtype_name} {name}")
                break
            problems = kernel_problems(B, seq, H, head_dim, dtype, device, extra=kind == "frames")
            base = launch_plan(head_dim, dtype, kind == "frames", False)
            new_rows, ms, best = _tune_shape(problems, base, pools.get(_variant(kind, seq), {}), timer, dry_run,
                                             dict(dtype=dtype_name, shape=name))
            rows += new_rows
            del problems
            if best is not None:
                entries.append({"arch": arch, "dtype": dtype_name, "head_dim": head_dim, "extra": kind == "frames",
                                "seq_bucket": seq_bucket(seq),
                                **{k: t if isinstance(t, int) else list(dataclasses.astuple(t))
                                   for k, t in best.items()},
                                "measured": {"device": device_name, "date": date, "shape": name, "timing": timer.how,
                                             "ms": {k: round(v, 5) for k, v in ms.items()}}})
        n = 256 * 197 * 3072 if not dry_run else 4096  # one MLP activation of B/16 over 256 frames
        new_rows, cand, ms = _tune_quick_gelu(n, dtype, device, pools.get("quick_gelu", {}).get("quick_gelu", []),
                                              timer, dry_run, dict(dtype=dtype_name, shape=f"quick_gelu n={n}"))
        rows += new_rows
        entries.append({"op": "quick_gelu", "arch": arch, "dtype": dtype_name, "block": cand[0], "num_warps": cand[1],
                        "measured": {"device": device_name, "date": date, "timing": timer.how,
                                     "ms": {k: round(v, 5) for k, v in ms.items()}}})

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuned.json").write_text(json.dumps({"format": 2, "entries": entries}, indent=1) + "\n")
    with open(out_dir / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dtype", "shape", "kernel", "tiles", "ms", "host_ms", "timing", "note"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"tuning on {device_name}: {len(entries)} table entries in {time.perf_counter() - start:.0f}s "
          f"(GPU ms per launch by {timer.how}; host ms: the host's time to issue one launch)")
    print(f"  {'dtype':9s} {'shape':22s} {'kernel':15s} {'tiles':18s} {'GPU ms':>9s} {'host ms':>8s}")
    for r in rows:
        if r["note"].startswith(("winner", "not tuned")):
            print(f"  {r['dtype']:9s} {r['shape']:22s} {r['kernel']:15s} {str(r['tiles']):18s} {r['ms']:>9s} "
                  f"{r['host_ms']:>8s}  {r['note']}")
    print(f"wrote {out_dir / 'tuned.json'} and {out_dir / 'tune.csv'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prune", action="store_true", help="compile the candidates for sm_90 and keep the good ones")
    parser.add_argument("--dry-run", action="store_true", help="walk every step on tiny shapes (CPU interpreter)")
    parser.add_argument("--out", default="tune-results", help="folder for tuned.json and tune.csv")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of timing before stopping (default 150)")
    args = parser.parse_args(argv)
    if args.prune:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if "TRITON_INTERPRET" in os.environ:  # the compiler must not run in interpreter mode
            return subprocess.call([sys.executable, __file__, "--prune"], env=env)
        result = prune(CANDIDATES)
        kept = sum(r["kept"] for r in result["reports"])
        print(f"kept {kept} of {len(result['reports'])} candidates -> {CANDIDATES}")
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return tune(Path(args.out), args.budget, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
