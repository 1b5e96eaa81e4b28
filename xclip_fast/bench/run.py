"""The run: each case and mode, every provider checked, timed and measured; the command line."""

from __future__ import annotations

import sys

import torch

from xclip_fast.argtypes import device_arg, frame_list, positive_int
from xclip_fast.bench.cases import LEVELS, MODES, build_cases
from xclip_fast.bench.gputime import GraphTimer, measure_or_profile
from xclip_fast.bench.kernels import kernel_rows
from xclip_fast.bench.measure import copy_bandwidth, cpu_memory, cuda_memory, free, time_interleaved, time_ms
from xclip_fast.bench.results import Result, append_rows, compare_to_reference, environment, table, write_outputs
from xclip_fast.bench.train import TRAIN_PROVIDERS, cuda_only, train_rows
from xclip_fast.bench.workloads import ALL_PROVIDERS, PROVIDERS, Workload, grad_out
from xclip_fast.dtypes import BY_NAME, dtype_name
from xclip_fast.encoder import PRESETS
from xclip_fast.testing import TOLERANCES, rel_err

__all__ = ["run_case", "main", "add_arguments"]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _truth(case, mode, device, quick):
    """High-precision results (float64 CPU / float32 CUDA without TF32) of the first provider that
    runs: the reference, else the fast torch path (e.g. when the reference runs out of memory)."""
    hi = torch.float64 if device.type == "cpu" else torch.float32
    order = ["reference", "xclip-fast-torch"] + (["xclip-fast-torch-chunked"] if case.level == "encoder" else [])
    for name in order:
        try:
            w = Workload(case, hi, device, grad=mode == "fwdbwd", quick=quick)
            out = w.run(w.provider(name), mode, grad_out(w, mode))
            res = {k: v.float().cpu() for k, v in w.results(out, mode).items()}
            del w, out
            free(device)
            return res, name
        except Exception as exc:
            free(device)
            if not _is_oom(exc):
                raise
    return None, "nothing fits in memory"

def _timed(work, fn, mode, grad_out):
    if mode == "fwdbwd":
        def call():
            work.clear_grads()
            return work.run(fn, mode, grad_out)
        return call
    return lambda: work.run(fn, mode)


def _time_by_graph(row, fn, device, timer) -> None:
    """The attention level on CUDA: GPU time by CUDA-graph replay, the host's time per call apart
    (:mod:`xclip_fast.bench.gputime`); a call that cannot be captured gets the profiler's kernel
    time, and ``extras["timing"]`` says so."""
    t = measure_or_profile(timer, [fn], device)
    row.median_ms, row.p20_ms, row.p80_ms = t.ms, t.p20, t.p80
    row.extras.update(host_ms=t.host_ms, timing=t.how)


def run_case(case, dtype, mode, providers, device, quick, copy_bw, env=None, timer=None):
    """All providers of one case and mode: check each against the high-precision truth, then time
    them (interleaved on CPU; at the attention level on CUDA, by CUDA-graph replay with the host
    time apart, and each of our kernels alone on rows ``xclip-fast-triton/<kernel>``), then measure
    their memory. ``timer``: the attention level's on CUDA (default :class:`GraphTimer`)."""
    env = env or environment(device)
    timer = timer or (GraphTimer(device) if device.type == "cuda" else None)
    rows = []
    truth, truth_name = _truth(case, mode, device, quick)
    tol = TOLERANCES[dtype]
    work = Workload(case, dtype, device, grad=mode == "fwdbwd", quick=quick)
    g_out = grad_out(work, mode)
    ref_err = None
    timed = {}
    for name in providers:
        row = Result.make(env, case, dtype_name(dtype), mode, name, checked_against=truth_name)
        rows.append(row)
        try:
            fn = work.provider(name)
            work.clear_grads()
            out = work.run(fn, mode, g_out)
            if truth is not None:
                errs = {k: rel_err(v.float().cpu(), truth[k]) for k, v in work.results(out, mode).items()}
                if name == "reference":
                    ref_err = max(errs.values())
                # the reference's own low-precision error sets the bar (at most 10x the dtype's tolerance)
                row.check(errs, min(max(tol, 2 * ref_err), 10 * tol) if ref_err is not None else tol)
            del out
            if row.status == "ok":
                timed[name] = _timed(work, fn, mode, g_out)
        except Exception as exc:
            row.fail(exc)
        finally:
            work.clear_grads()
            free(device)
    by_name = {r.provider: r for r in rows}
    if device.type == "cpu" and timed:
        for name, (med, p20, p80) in time_interleaved(timed, quick).items():
            by_name[name].median_ms, by_name[name].p20_ms, by_name[name].p80_ms = med, p20, p80
    for name, fn in timed.items():
        row = by_name[name]
        try:
            if device.type == "cuda":
                if case.level == "attention":
                    _time_by_graph(row, fn, device, timer)
                else:
                    row.median_ms, row.p20_ms, row.p80_ms = time_ms(fn, device, quick)
                row.peak_mib, row.extra_mib = cuda_memory(fn, device)
            else:
                row.extra_mib = cpu_memory(case, dtype, name, mode, quick)
        except Exception as exc:
            row.fail(exc)
        finally:
            work.clear_grads()
            free(device)
    if device.type == "cuda" and case.level == "attention" and "xclip-fast-triton" in timed:
        try:  # each of our kernels alone, the backward's three launches on rows of their own
            rows += kernel_rows(case, dtype, mode, device, env, timer, copy_bw)
        except Exception as exc:
            row = Result.make(env, case, dtype_name(dtype), mode, "xclip-fast-triton/kernels")
            row.fail(exc)
            rows.append(row)
        free(device)
    flops, nbytes = work.flops(mode), work.bytes(mode)
    for row in rows:
        if "/" in row.provider:  # a kernel row counts its own FLOPs and bytes
            continue
        if case.level == "encoder":
            row.extras = dict(weights_mib=work.weights_mib, activation_mib=work.activation_mib)
        if row.status == "ok" and row.median_ms is not None and flops:
            row.tflops = flops / (row.median_ms * 1e-3) / 1e12
            row.gbps = nbytes / (row.median_ms * 1e-3) / 1e9
            row.bandwidth_fraction = row.gbps / copy_bw if copy_bw else None
    compare_to_reference(rows)
    del work
    free(device)
    return rows



def _progress(n: int, total: int, what: str) -> None:
    """Case ``n`` of ``total`` starts: one line on stderr (the bench mostly runs into log files, where
    a progress bar's redraws are noise)."""
    print(f"[{n}/{total}] {what}", file=sys.stderr, flush=True)


def _train_providers(wanted, quick: bool, cuda: bool):
    """The training level's providers: those asked for (the original always), else all of them; a
    quick CPU run leaves the compiled original out (compiling its backward takes minutes on 2 cores)
    and the memory budgets (``benchmarks/training_memory.py`` measures their curve); offloading and
    CUDA graphs run on CUDA only."""
    if wanted:
        return ["reference", *[p for p in TRAIN_PROVIDERS if p in wanted and p != "reference"]]
    return [p for p in TRAIN_PROVIDERS if not (quick and not cuda and ("compiled" in p or "budget" in p))
            and (cuda or not cuda_only(p))]


def _usage(problem: str) -> int:
    """An option that cannot run: said in one line, exit code 2 (as argparse does), before any work."""
    print(f"error: {problem}", file=sys.stderr)
    return 2


def auto_lines(plan, dtype: torch.dtype, device: torch.device) -> list[str]:
    """What ``backend="auto"`` runs for the attentions of each (case, mode) on ``device``, eager and compiled,
    and why (:func:`xclip_fast.autochoice.describe`): one line per attention and mode."""
    from xclip_fast.autochoice import block_calls, describe

    seen, lines = set(), ["backend='auto' (docs/backends.md, 'How auto chooses'):"]
    wanted = {"frames": ("frame attention",), "messages": ("message attention",)}
    for case, mode in plan:
        calls = [(what, call) for what, call in block_calls(case.batch, case.frames, case.tokens, case.heads,
                                                            mode == "fwdbwd")
                 if what in wanted.get(case.kind, (what,))]
        for what, call in calls:
            for compiled in (False, True):
                dec = describe(device, dtype, case.width // case.heads, call, compiled=compiled)
                line = (f"  {what} {case.tokens if 'frame' in what else case.frames} x {call.batch} "
                        f"{'training' if call.training else 'forward'} {'compiled' if compiled else 'eager'}: "
                        f"{dec.backend} ({dec.source}: {dec.reason})")
                if line not in seen:
                    seen.add(line)
                    lines.append(line)
    return lines if len(lines) > 1 else []


def main(args) -> int:
    """``xclip-fast bench``: see ``xclip-fast bench --help``."""
    import os

    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out}: exists and is not a folder (results are written into a folder)",
              file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if args.level == "inference":
        return _inference(args, device)
    dtype = BY_NAME[args.dtype or ("bfloat16" if cuda else "float32")]
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return _usage(f"--dtype {args.dtype} on CPU: use float32 (half-precision CPU kernels are not what anyone "
                      "runs X-CLIP on)")
    levels = (*LEVELS, "train") if args.level == "all" else (args.level,)
    quick = args.quick or (not cuda and not args.full)
    if quick and not args.quick:
        print("CPU run: small sizes and few repeats (about 3 minutes on 2 cores; --full runs the full sweep).")
    model = args.model or ("b16" if cuda else "b32")
    frames = args.frames  # a list of ints >= 1 (checked by argparse), or None
    batch = args.batch or (8 if cuda else 1)
    modes = MODES if args.mode == "both" else (args.mode,)
    wanted = args.providers.split(",") if args.providers else None
    if wanted:
        known = sorted({*ALL_PROVIDERS, *TRAIN_PROVIDERS})
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            return _usage(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        if "reference" not in wanted:
            wanted = ["reference", *wanted]  # every ratio is against the reference
    if not cuda:
        print("CPU run: the triton provider is left out (Triton kernels need CUDA; on CPU they run only in the "
              "interpreter, which checks correctness and is not for timing).")
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
    cases = build_cases(levels, model, frames, batch, quick, cuda)
    env = environment(device)
    copy_bw = copy_bandwidth(device)
    plan = [(c, m, [p for p in PROVIDERS[c.level] if not wanted or p in wanted])
            for c in cases for m in modes if not (c.level == "encoder" and m == "fwdbwd")]
    train_frames = (frames or ([8] if quick else [8, 32])) if "train" in levels else []
    train_providers = _train_providers(wanted, quick, cuda)
    # one line per case (one case: every provider of one size and mode), as it starts
    total = len(plan) + len(train_frames)
    rows = []
    interrupted = False
    try:
        for i, (case, mode, provs) in enumerate(plan, 1):
            _progress(i, total, f"{case.label} {mode}")
            new = run_case(case, dtype, mode, provs, device, quick, copy_bw, env)
            append_rows(new, args.out)
            rows += new
        for i, T in enumerate(train_frames, len(plan) + 1):
            _progress(i, total, f"train {model} b={batch} T={T}")
            new = train_rows(model, [T], batch, device, quick, env, train_providers)
            append_rows(new, args.out)
            rows += new
    except KeyboardInterrupt:  # a time limit's SIGINT: report the cases that finished
        interrupted = True
    if interrupted:
        print(f"interrupted: the {len(rows)} row(s) of the cases that finished follow", file=sys.stderr)
    print(table(rows, env))
    print(f"copy bandwidth: {copy_bw:.0f} GB/s (read + write)")
    for line in auto_lines([(c, m) for c, m, _ in plan], dtype, device):
        print(line)
    paths = write_outputs(rows, env, args.out, copy_bw, appended=True)
    print("wrote " + ", ".join(paths.values()))
    if interrupted:
        return 130
    bad = [r for r in rows if r.status in ("mismatch", "error")]
    if bad:
        print(f"{len(bad)} provider run(s) disagreed with the reference or failed:", file=sys.stderr)
        for r in bad:
            print(f"  {r.case} {r.mode} {r.provider}: {r.status}: {r.reason}", file=sys.stderr)
        return 1
    return 0


def _inference(args, device) -> int:
    """``--level inference``: the providers of :mod:`xclip_fast.bench.inference` (not part of ``all``:
    it compiles and exports, minutes per model on a CPU)."""
    import os

    from xclip_fast.bench.inference import INFERENCE_PROVIDERS, inference_rows, inference_table
    from xclip_fast.dtypes import chosen_dtype

    cuda = device.type == "cuda"
    quick = args.quick or (not cuda and not args.full)
    dtype = chosen_dtype(args.dtype, device)
    wanted = args.providers.split(",") if args.providers else None
    if wanted:
        unknown = sorted(set(wanted) - set(INFERENCE_PROVIDERS))
        if unknown:
            return _usage(f"--providers: unknown inference provider(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(INFERENCE_PROVIDERS)}")
        wanted = ["reference", *[p for p in wanted if p != "reference"]]  # every ratio is against the reference
    models = [args.model] if args.model else (["b32"] if quick else ["b32", "b16"])
    frames = args.frames or ([8] if quick else [8, 32])
    batches = [args.batch] if args.batch else ([1] if quick else [1, 8])
    if quick and not args.quick:
        print(f"CPU run: few repeats, {', '.join(models)} at T={frames}, batch {batches} (--full: more repeats and, by "
              "default, B/32 and B/16 at T=8 and 32, batch 1 and 8; long on a CPU).")
    env = environment(device)
    rows = inference_rows(models, frames, batches, dtype, device, quick, env, os.path.join(args.out, "artifacts"),
                          providers=wanted)
    print(inference_table(rows, env))
    paths = write_outputs(rows, env, args.out, copy_bandwidth(device))
    print("wrote " + ", ".join(paths.values()))
    bad = [r for r in rows if r.status in ("mismatch", "error")]
    for r in bad:
        print(f"  {r.case} {r.dtype} {r.provider}: {r.status}: {r.reason}", file=sys.stderr)
    return 1 if bad else 0


def add_arguments(p) -> None:
    p.add_argument("--level", default="all", choices=[*LEVELS, "train", "inference", "all"],
                   help="train: the encoder's forward + backward + AdamW step at every recompute level against the "
                   "original, the original with selective checkpointing and the original compiled; inference "
                   "(not in all): the original and the fast encoder eager and compiled, the exported .pt2 package "
                   "and ONNX Runtime, per video (default dtype: bf16 on CPUs with native bf16)")
    p.add_argument("--model", default=None, choices=sorted(PRESETS), help="default b16 on CUDA, b32 on CPU")
    p.add_argument("--frames", type=frame_list, default=None, help="comma list of T for the block and encoder "
                   "levels (default: 8,16,32 and long clips up to 512 for blocks, 8 to 1024 for the encoder on CUDA)")
    p.add_argument("--batch", type=positive_int, default=None, help="videos b at the block level for T <= 32 "
                   "(default 8 on CUDA, 1 on CPU; long clips run one video); the inference level's batch "
                   "(default 1 and 8; quick: 1)")
    p.add_argument("--dtype", default=None, choices=sorted(BY_NAME), help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--mode", default="both", choices=[*MODES, "both"])
    p.add_argument("--providers", default=None, help=f"comma list from {', '.join(ALL_PROVIDERS)}")
    p.add_argument("--device", type=device_arg, default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available")
    p.add_argument("--out", default="bench-results", help="folder for results.csv/.jsonl, run JSON and the plot")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (the default on CPU)")
    p.add_argument("--full", action="store_true", help="on CPU: the full sweep (larger sizes, more repeats, "
                   "the compiled original in the training level; 10 minutes or more on 2 cores)")
