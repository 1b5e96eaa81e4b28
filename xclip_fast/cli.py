"""The ``xclip-fast`` command.

    xclip-fast check     the fast block against the reference on random data (errors per tensor)
    xclip-fast bench     speed and peak memory against the reference and other attention paths
    xclip-fast encode    video files -> X-CLIP video embeddings (.npy)
    xclip-fast export    the video encoder as one deployable file (.pt2 package or ONNX)
"""

from __future__ import annotations

import argparse
import sys

import torch

from xclip_fast.argtypes import (
    device_arg,
    fast_backends,
    int_range,
    parse_device,
    positive_float,
    positive_int,
    span,
)
from xclip_fast.dtypes import BY_NAME as _DTYPES
from xclip_fast.dtypes import chosen_dtype
from xclip_fast.testing import TOLERANCES, rel_err


def _check(args) -> int:
    from xclip_fast import reference
    from xclip_fast.blocks import CrossFrameAttentionBlock
    from xclip_fast.ops import triton_limits

    device = parse_device(args.device)
    dtype = _DTYPES[args.dtype]
    backends = args.backends.split(",") if args.backends else ["torch", "triton"]
    torch.manual_seed(args.seed)
    l, b, T, d, H = args.tokens, args.batch, args.frames, args.width, args.heads
    ref = reference.CrossFramelAttentionBlock(d, H, T=T).to(device=device, dtype=dtype)
    truth = reference.CrossFramelAttentionBlock(d, H, T=T).to(device=device, dtype=torch.float64)
    truth.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, device=device, dtype=dtype)
    grad = torch.randn_like(x)

    def run(module, xi):
        xi = xi.clone().requires_grad_()
        y = module(xi)
        y.backward(grad.to(y.dtype))
        return {"output": y, "grad x": xi.grad, **{f"grad {n}": p.grad for n, p in module.named_parameters()}}

    exact = run(truth, x.double())
    ref_errors = {k: rel_err(v, exact[k]) for k, v in run(ref, x).items()}
    print(f"device {device}, dtype {args.dtype}, l={l} b={b} T={T} d={d} heads={H}; relative errors against the "
          f"original block in float64; a tensor fails above max({TOLERANCES[dtype]:g}, 2 x the original's own error "
          f"in {args.dtype})")
    print(f"  {'original':8s}    : output {ref_errors['output']:.2e}, grad x {ref_errors['grad x']:.2e} "
          f"(the original block run in {args.dtype})")
    for line in auto_lines(device, dtype, l, b, T, d, H):
        print(line)
    failed = False
    for backend in backends:
        reasons = triton_limits(device, dtype, d // H) if backend == "triton" else []
        if reasons:
            print(f"  {backend:8s} skipped: {'; '.join(reasons)}")
            continue
        block = CrossFrameAttentionBlock(d, H, T=T, backend=backend).to(device=device, dtype=dtype)
        block.load_state_dict(ref.state_dict())
        errors = {k: rel_err(v, exact[k]) for k, v in run(block, x).items()}
        bad = {k: e for k, e in errors.items() if e > max(TOLERANCES[dtype], 2 * ref_errors[k])}
        worst = max(errors, key=errors.get)
        status = "FAIL" if bad else "ok"
        failed |= bool(bad)
        print(f"  {backend:8s} {status:4s}: output {errors['output']:.2e}, grad x {errors['grad x']:.2e}, "
              f"worst {worst} {errors[worst]:.2e} (original {ref_errors[worst]:.2e}; {len(errors)} tensors)")
        for k in bad:
            print(f"           {k}: {errors[k]:.2e} > max({TOLERANCES[dtype]:g}, 2 x {ref_errors[k]:.2e})")
    return 1 if failed else 0


def auto_lines(device, dtype, l: int, b: int, T: int, d: int, H: int) -> list[str]:
    """What ``backend="auto"`` runs for the two attentions of a block of these sizes on ``device``, forward
    and training, eager and compiled, and why (:func:`xclip_fast.autochoice.describe`)."""
    from xclip_fast.autochoice import block_calls, describe

    lines = []
    for what, call in block_calls(b, T, l, H, False):
        for training in (False, True):
            for compiled in (False, True):
                decision = describe(device, dtype, d // H, call._replace(training=training), compiled=compiled)
                mode = f"{'training' if training else 'forward'}, {'compiled' if compiled else 'eager'}"
                lines.append((f"{what:17s} {mode:18s}", decision))
    head = "  backend='auto' on this machine (docs/backends.md, 'How auto chooses')"
    if len({(dec.backend, dec.reason) for _, dec in lines}) == 1:
        dec = lines[0][1]
        return [f"{head}: {dec.backend} for both attentions, forward and training, eager and compiled ({dec.source}: "
                f"{dec.reason})"]
    return [f"{head}:"] + [f"    {what} -> {dec.backend:6s} ({dec.source}: {dec.reason})" for what, dec in lines]


def load_encoder(weights: str | None, preset: str | None, frames: int | None, trust: bool):
    """``(encoder, random_weights)`` from ``--weights`` (official checkpoint or Hugging Face files)
    or, without weights, a preset with random weights (``frames`` sets its MIT length)."""
    import os

    from xclip_fast.checkpoints import looks_local, read_checkpoint
    from xclip_fast.encoder import XCLIPVideoEncoder

    if weights is None:
        return XCLIPVideoEncoder.from_config(preset or "b32", num_frames=frames), True
    if os.path.isdir(weights) or (not os.path.exists(weights) and not looks_local(weights)):
        return XCLIPVideoEncoder.from_hf(weights), False
    if not os.path.isfile(weights):
        raise ValueError(f"--weights {weights}: no such file or folder")
    sd = read_checkpoint(weights, weights_only=not trust)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    keys = list(sd) if isinstance(sd, dict) else []
    if any(k.startswith("visual.") for k in keys):
        return XCLIPVideoEncoder.from_official(sd), False
    if any(k.startswith(("vision_model.", "embeddings.")) for k in keys):
        return XCLIPVideoEncoder.from_hf(sd, strict=False), False
    raise ValueError(f"--weights {weights}: unknown weight format (expected an official X-CLIP checkpoint with "
                     "'visual.*' keys or Hugging Face X-CLIP weights with 'vision_model.*' keys)")


def unwritable(folder: str) -> str | None:
    """Why no file can be created in ``folder`` (None when one can): a file is created there and
    removed, which tells what permission bits alone do not (a read-only file system, an ACL, root)."""
    import os
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".xclip-fast-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.remove(probe)
    return None


def _check_outputs(args) -> str | None:
    """Every problem with the output options, found before any work (None when they are fine)."""
    import os

    from xclip_fast.extract import check_out_dir

    if args.out is not None and args.out_dir is not None:
        return "give --out or --out-dir, not both"
    if args.window is not None and args.out_dir is None:
        return "--window writes one (windows, E) array per video: give --out-dir"
    if args.stride is not None and args.window is None:
        return "--stride needs --window"
    if args.fps is not None and args.window is None:
        return "--fps sets the frame rate of --window: give --window (one embedding per video samples T frames)"
    if args.out_dir is not None:
        if os.path.lexists(args.out_dir) and not os.path.isdir(args.out_dir):
            return f"--out-dir {args.out_dir}: exists and is not a folder"
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as exc:
            return f"--out-dir {args.out_dir}: cannot create it ({exc.strerror or exc})"
        why = unwritable(args.out_dir)
        if why:
            return f"--out-dir {args.out_dir}: not writable ({why})"
        return check_out_dir(args.out_dir)
    out = args.out or "embeddings.npy"
    if not out.endswith(".npy"):
        return f"--out {out}: the file must end in .npy (it holds one numpy array)"
    for path in [out] + ([out[:-4] + "_frames.npy"] if args.per_frame else []):
        if os.path.isdir(path):
            return f"--out {out}: {path} is a folder (the run writes a file there)"
        if os.path.lexists(path) and not os.path.isfile(path):
            return f"--out {out}: {path} exists and is not a regular file"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        return f"--out {out}: the folder {folder} does not exist"
    why = unwritable(folder)
    if why:
        return f"--out {out}: the folder {folder} is not writable ({why})"
    return None


def run_settings(args, encoder, dtype: torch.dtype, T: int) -> dict:
    """What decides the results of ``encode``: a rerun into the same ``--out-dir`` reuses a video's
    outputs only when these are the same (the weights by a digest of their values, so random weights
    are never reused)."""
    from xclip_fast import extract

    cfg = encoder.config
    return dict(frames=T, window=args.window, stride=args.stride, fps=args.fps, per_frame=bool(args.per_frame),
                size=cfg["input_resolution"], dtype=str(dtype).removeprefix("torch."),
                weights=extract.weights_digest(encoder))


def _load_or_say(args, frames: int | None, use: str, rank: int):
    """The encoder of ``--weights`` / ``--preset`` (:func:`load_encoder`), or None after printing why
    not; random weights are announced (rank 0, stdout and stderr) as "... RANDOM weights is <use>"."""
    try:
        encoder, random_weights = load_encoder(args.weights, args.preset, frames, args.trust_weights)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if random_weights and rank == 0:
        banner = f"WARNING: no --weights given: the {args.preset or 'b32'} preset with RANDOM weights is {use}"
        print(banner)
        print(banner, file=sys.stderr)
    return encoder


def _export(args) -> int:
    import os

    from xclip_fast.export import export_encoder, format_of

    problem = None
    try:
        fmt = format_of(args.out, args.format)
    except ValueError as exc:
        problem = str(exc)
    if problem is None and os.path.isdir(args.out):
        problem = f"--out {args.out}: is a folder (the export writes one file)"
    folder = os.path.dirname(os.path.abspath(args.out))
    if problem is None and not os.path.isdir(folder):
        problem = f"--out {args.out}: the folder {folder} does not exist"
    if problem is None and os.path.lexists(args.out) and not os.path.isfile(args.out):
        problem = f"--out {args.out}: exists and is not a regular file"
    why = None if problem else unwritable(folder)
    if why:
        problem = f"--out {args.out}: the folder {folder} is not writable ({why})"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    encoder = _load_or_say(args, args.num_frames, "exported", rank=0)
    if encoder is None:
        return 2
    device = parse_device(args.device or "cpu")
    if fmt == "onnx" and args.dtype is None:
        dtype = torch.float32  # ONNX Runtime's CPU provider has no bf16 kernels
    else:
        dtype = chosen_dtype(args.dtype, device)
    encoder.backend = args.backend
    try:
        done = export_encoder(encoder, args.out, format=fmt, dtype=dtype, input=args.input, batch=args.batch,
                              frames=args.frames, device=device)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: the file at --out is as it was
        print(f"error: writing --out {args.out} failed: {exc}", file=sys.stderr)
        return 1
    meta = done.metadata
    print(f"wrote {done.path}: {fmt}, {meta['xclip_fast.weights_dtype']} weights, {done.bytes / 2**20:.1f} MiB; "
          f"input video ({meta['xclip_fast.batch']}, {meta['xclip_fast.frames']}, 3, {meta['xclip_fast.resolution']}, "
          f"{meta['xclip_fast.resolution']}) {meta['xclip_fast.input_dtype']}"
          f"{' RGB 0-255' if args.input == 'uint8' else ' normalised'} -> {meta['xclip_fast.output']}")
    if fmt == "pt2":
        print("load: torch._inductor.aoti_load_package(path), with AOTI_RUNTIME_CHECK_INPUTS=1 set for input checks")
    return 0


def _encode(args) -> int:
    import os

    from xclip_fast import extract

    problem = _check_outputs(args)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if problem is None and world > 1 and args.out_dir is None:
        problem = "under torchrun, give --out-dir (each rank writes its own videos)"
    window = extract.parse_span(args.window) if args.window is not None else None  # checked by argparse
    stride = extract.parse_span(args.stride) if args.stride is not None else None
    if args.workers < 0:
        problem = problem or f"--workers must be >= 0, got {args.workers}"
    if problem is None:
        try:
            jobs = extract.discover(args.videos, args.list)
        except ValueError as exc:
            problem = str(exc)
        else:
            if not jobs:
                problem = "no videos given (files, folders or --list)"
    lock = None
    if problem is None and args.out_dir is not None and rank == 0:  # one run at a time into a folder
        try:
            lock = extract.lock_out_dir(args.out_dir)
        except extract.OutDirBusy as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"--out-dir {args.out_dir}: cannot write into it ({exc.strerror or exc})"
    if problem and world == 1:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return _encode_locked(args, jobs if not problem else None, problem, rank, world, window, stride)
    finally:
        if lock is not None:
            lock.close()


def _encode_locked(args, jobs, problem, rank: int, world: int, window, stride) -> int:
    """:func:`_encode` once rank 0 holds the lock of ``--out-dir`` (or ``problem`` says why not,
    under torchrun: every rank then stops, after hearing it from the others)."""
    import os

    import numpy as np

    from xclip_fast import extract

    device = parse_device(args.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        stop = torch.tensor([problem is not None], dtype=torch.int32, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(stop)  # (a rank that cannot start stops them all: rank 0 alone takes the lock)
        if stop.item():
            if problem:
                print(f"error: {problem}", file=sys.stderr)
            dist.destroy_process_group()
            return 2
    encoder = _load_or_say(args, args.frames, "used; the embeddings are meaningless except for trying the pipeline "
                           "out", rank)
    if encoder is None:
        return 2
    dtype = chosen_dtype(args.dtype, device, announce=rank == 0)
    T = args.frames or encoder.config["num_frames"]
    settings = run_settings(args, encoder, dtype, T) if args.out_dir is not None else {}
    encoder = encoder.to(device, dtype).eval()
    encoder.backend = args.backend
    ex = extract.Extractor(
        encoder, device, dtype, T, encoder.config["input_resolution"], out_dir=args.out_dir, window=window,
        stride=stride, fps=args.fps, chunk_frames=args.chunk_frames, batch=args.batch, workers=args.workers,
        per_frame=args.per_frame, timeout=args.timeout, rank=rank, world=world, progress=not args.quiet,
        settings=settings)
    if args.out_dir is not None:  # (under the lock: it reads the index)
        jobs = extract.prepare(jobs, args.out_dir, announce=rank == 0)
    try:
        ex.run(jobs[rank::world])
    except OSError as exc:  # a full disk, a file size limit: the outputs of this run are not all there
        print(f"error: writing the outputs failed: {exc}. What was written is kept: rerun the same command to go on "
              "once the cause is fixed", file=sys.stderr)
        return 1
    failed = ex.stats["failed"]
    if world > 1:
        import torch.distributed as dist

        counts = torch.tensor([failed], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(counts)
        failed = int(counts.item())
        dist.barrier()
    if args.out_dir is not None and rank == 0:
        try:
            extract.merge_index(args.out_dir, world)
        except OSError as exc:
            print(f"error: writing {args.out_dir}/{extract.INDEX} failed: {exc}. The per-rank logs are kept: rerun the "
                  "same command once the cause is fixed", file=sys.stderr)
            return 1
    if args.out_dir is None:
        out = args.out or "embeddings.npy"
        E = encoder.config["embed_dim"]
        embeds = np.stack([ex.results[j.index][0] if j.index in ex.results else extract.nan_rows(E) for j in jobs])
        extract.atomic_save(out, embeds)
        written = [out]
        if args.per_frame:
            frames_path = out[:-4] + "_frames.npy"
            extract.atomic_save(frames_path, np.stack([ex.results[j.index][1] if j.index in ex.results
                                                        else extract.nan_rows((T, E)) for j in jobs]))
            written.append(frames_path)
        note = f" (rows of the {failed} failed video(s) are NaN)" if failed else ""
        print(f"wrote {', '.join(written)}: ({len(jobs)}, {E}) in input order{note}")
    if rank == 0:
        print(extract.summary_line(ex.stats, world) + (f" -> {args.out_dir}/{extract.INDEX}" if args.out_dir else ""))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no process tears its connections down while another still uses them
        dist.destroy_process_group()
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xclip-fast", description="Fast, lean X-CLIP video encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="compare the fast block with the reference on random data")
    check.add_argument("--backends", type=fast_backends, default=None,
                       help="comma list of torch,triton (default: both)")
    check.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:i] (default: cuda when "
                       "available)")
    check.add_argument("--dtype", default="float64", choices=sorted(_DTYPES))
    check.add_argument("--tokens", type=positive_int, default=50, help="tokens per frame l (default 50)")
    check.add_argument("--batch", type=positive_int, default=2, help="videos b (default 2)")
    check.add_argument("--frames", type=positive_int, default=8, help="frames per video T (default 8)")
    check.add_argument("--width", type=positive_int, default=128, help="width d (default 128)")
    check.add_argument("--heads", type=positive_int, default=2, help="heads, dividing --width (default 2)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_check)

    from xclip_fast import bench

    bench_parser = sub.add_parser("bench", help="speed and peak memory against the reference, torch.compile, "
                                  "SDPA and xformers (table, CSV/JSON, plot)")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.main)

    from xclip_fast.encoder import PRESETS

    enc = sub.add_parser("encode", help="encode videos (files, folders, lists) into X-CLIP embeddings (.npy)",
                         description="Encode videos into X-CLIP video embeddings. Decoding runs in worker processes; "
                         "failures are recorded and the run goes on (exit code 1 if any video failed, 2 for bad "
                         "options). Under torchrun each rank encodes its share of the videos.")
    enc.add_argument("videos", nargs="*", help="video files and folders (searched recursively by extension)")
    enc.add_argument("--list", default=None, help="a text file with one video path per line (relative to the file)")
    enc.add_argument("--weights", default=None, help="official X-CLIP checkpoint (.pth), Hugging Face weights "
                     "(folder, .safetensors, .bin) or hub name; without it a preset with random weights is used")
    enc.add_argument("--preset", default=None, choices=sorted(PRESETS), help="architecture without --weights "
                     "(default b32)")
    enc.add_argument("--trust-weights", action="store_true", help="allow pickled objects in --weights (official "
                     "files pickle their training config); only for files you trust")
    enc.add_argument("--frames", type=positive_int, default=None,
                     help="frames T sampled per video (default: the model's)")
    enc.add_argument("--chunk-frames", type=positive_int, default=None, help="embed and run intra-frame layers over "
                     "chunks of this many frames (bounded memory for long clips)")
    enc.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:i] (default: cuda when "
                     "available)")
    enc.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default float16 on CUDA; on CPU bfloat16 "
                     "where the CPU has native bf16 (AVX512-BF16, AMX), else float32")
    enc.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    enc.add_argument("--out", default=None, help="one .npy file (the name must end in .npy) holding (videos, E) in "
                     "input order, NaN rows for failed videos (default embeddings.npy when --out-dir is not given)")
    enc.add_argument("--out-dir", default=None, help="one <name>.npy per video and index.jsonl (path, status, frames, "
                     "fps, duration, windows, error); a rerun skips the videos already done")
    enc.add_argument("--per-frame", action="store_true", help="also write per-frame embeddings (<out>_frames.npy, or "
                     "<name>.frames.npy per video)")
    enc.add_argument("--window", type=span, default=None, help="sliding windows: frames per window (16) or seconds "
                     "(4s); each video gives (windows, E) and <name>.times.npy with start/end seconds")
    enc.add_argument("--stride", type=span, default=None, help="window stride in frames or seconds (default: the "
                     "window)")
    enc.add_argument("--fps", type=positive_float, default=None, help="with --window: take frames at this rate "
                     "(default: every frame of the video)")
    enc.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0 decodes in the main "
                     "process)")
    enc.add_argument("--batch", type=positive_int, default=1, help="clips or windows encoded together (default 1)")
    enc.add_argument("--timeout", type=positive_float, default=10.0, help="seconds FFmpeg may wait for data "
                     "(default 10)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(func=_encode)

    exp = sub.add_parser("export", help="the video encoder as one deployable file: a PyTorch 2 package (.pt2) or "
                         "ONNX", description="Export the video encoder (video -> video embedding) with a dynamic "
                         "batch and frame count. A .pt2 package loads with torch alone "
                         "(torch._inductor.aoti_load_package); an .onnx model runs in ONNX Runtime.")
    exp.add_argument("--out", required=True, help="the file: *.pt2 or *.onnx")
    exp.add_argument("--format", default=None, choices=["pt2", "onnx"], help="default: from the --out name")
    exp.add_argument("--weights", default=None, help="as for encode; without it a preset with random weights")
    exp.add_argument("--preset", default=None, choices=sorted(PRESETS), help="architecture without --weights "
                     "(default b32)")
    exp.add_argument("--trust-weights", action="store_true", help="allow pickled objects in --weights")
    exp.add_argument("--num-frames", type=positive_int, default=None, help="without --weights: the frames the "
                     "random MIT is built for (default: the preset's)")
    exp.add_argument("--frames", type=int_range, default=(1, 256), help="the frame counts the artifact takes, "
                     "MIN:MAX (default 1:256)")
    exp.add_argument("--batch", type=int_range, default=(1, 64), help="the batch sizes, MIN:MAX (default 1:64)")
    exp.add_argument("--input", default="float", choices=["float", "uint8"], help="float: normalised float32 "
                     "frames (default); uint8: raw RGB 0-255, normalised inside the artifact")
    exp.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="the weights' dtype: default bfloat16 for a .pt2 on a CPU with native bf16, else "
                     "float32 (ONNX: float32; ONNX Runtime's CPU provider has no bf16)")
    exp.add_argument("--device", type=device_arg, default=None, help=".pt2: the device it is compiled for (cpu "
                     "or cuda; default cpu)")
    exp.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                     help="the backend traced (CPU and ONNX: torch; CUDA: the Triton kernels by default)")
    exp.set_defaults(func=_export)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check" and args.width % args.heads:
        parser.error(f"check: --width {args.width} must be divisible by --heads {args.heads}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
