"""The ``xclip-fast`` command.

    xclip-fast check     the fast block against the reference on random data (errors per tensor)
    xclip-fast bench     speed and peak memory against the reference and other attention paths
    xclip-fast encode    video files -> X-CLIP video embeddings (.npy)
"""

from __future__ import annotations

import argparse
import sys

import torch

from xclip_fast.dtypes import BY_NAME as _DTYPES
from xclip_fast.testing import TOLERANCES, rel_err


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


def load_encoder(weights: str | None, preset: str | None, frames: int | None, trust: bool):
    """``(encoder, random_weights)`` from ``--weights`` (official checkpoint or Hugging Face files)
    or, without weights, a preset with random weights (``frames`` sets its MIT length)."""
    import os
    import re

    from xclip_fast.checkpoints import _read_file
    from xclip_fast.encoder import XCLIPVideoEncoder

    if weights is None:
        return XCLIPVideoEncoder.from_config(preset or "b32", num_frames=frames), True
    if os.path.isdir(weights) or (not os.path.exists(weights) and re.fullmatch(r"[\w.-]+/[\w.-]+", weights)):
        return XCLIPVideoEncoder.from_hf(weights), False
    if not os.path.isfile(weights):
        raise ValueError(f"--weights {weights}: no such file or folder")
    sd = _read_file(weights, weights_only=not trust)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    keys = list(sd) if isinstance(sd, dict) else []
    if any(k.startswith("visual.") for k in keys):
        return XCLIPVideoEncoder.from_official(sd), False
    if any(k.startswith(("vision_model.", "embeddings.")) for k in keys):
        return XCLIPVideoEncoder.from_hf(sd, strict=False), False
    raise ValueError(f"--weights {weights}: unknown weight format (expected an official X-CLIP checkpoint with "
                     "'visual.*' keys or Hugging Face X-CLIP weights with 'vision_model.*' keys)")


def _encode(args) -> int:
    import os

    import numpy as np

    from xclip_fast.video import VideoError, read_frames

    try:
        encoder, random_weights = load_encoder(args.weights, args.preset, args.frames, args.trust_weights)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if random_weights:
        banner = (f"WARNING: no --weights given: the {args.preset or 'b32'} preset with RANDOM weights is used; "
                  "the embeddings are meaningless except for trying the pipeline out")
        print(banner)
        print(banner, file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    encoder = encoder.to(device, dtype).eval()
    encoder.backend = args.backend
    T = args.frames or encoder.config["num_frames"]
    size = encoder.config["input_resolution"]
    videos, frames_out = [], []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for path in args.videos:
        bar = tqdm(total=len(encoder.visual.blocks), desc=os.path.basename(path), unit="layer", file=sys.stderr,
                   leave=False) if tqdm else None
        try:
            stream = (f.to(dtype) for f in read_frames(path, T, size))
            feats = encoder.encode_frames(stream, T, chunk_frames=args.chunk_frames,
                                          progress=bar.update if bar else None)
        except (VideoError, ValueError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        finally:
            if bar:
                bar.close()
        videos.append(feats.video_embeds[0].float().cpu().numpy())
        frames_out.append(feats.frame_embeds[0].float().cpu().numpy())
    out = args.out
    np.save(out, np.stack(videos))
    written = [out]
    if args.per_frame:
        frames_path = out[:-4] + "_frames.npy" if out.endswith(".npy") else out + "_frames.npy"
        np.save(frames_path, np.stack(frames_out))
        written.append(frames_path)
    print(f"encoded {len(videos)} video(s), T={T}, {dtype}, {device}: wrote {', '.join(written)}")
    return 0


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

    from xclip_fast.encoder import PRESETS

    enc = sub.add_parser("encode", help="encode video files into X-CLIP video embeddings (.npy)")
    enc.add_argument("videos", nargs="+", help="video files (anything FFmpeg reads)")
    enc.add_argument("--weights", default=None, help="official X-CLIP checkpoint (.pth), Hugging Face weights "
                     "(folder, .safetensors, .bin) or hub name; without it a preset with random weights is used")
    enc.add_argument("--preset", default=None, choices=sorted(PRESETS), help="architecture without --weights "
                     "(default b32)")
    enc.add_argument("--trust-weights", action="store_true", help="allow pickled objects in --weights (official "
                     "files pickle their training config); only for files you trust")
    enc.add_argument("--frames", type=int, default=None, help="frames T sampled per video (default: the model's)")
    enc.add_argument("--chunk-frames", type=int, default=None, help="embed and run intra-frame layers over chunks "
                     "of this many frames (bounded memory for long clips)")
    enc.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    enc.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default float16 on CUDA, float32 on CPU")
    enc.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    enc.add_argument("--out", default="embeddings.npy", help="output .npy, (videos, E) (default embeddings.npy)")
    enc.add_argument("--per-frame", action="store_true", help="also write <out>_frames.npy, (videos, T, E)")
    enc.set_defaults(func=_encode)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
