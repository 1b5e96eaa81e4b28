"""Feature-extraction throughput: seeking against full decoding, and decode / encode / overlapped.

    python benchmarks/extract_bench.py --out DIR [--minutes 10] [--videos 12] [--workers 2]

1. One generated video of ``--minutes`` minutes (25 fps, a key frame every 4 s): the official
   T = 8 sample read by seeking (:class:`xclip_fast.video.VideoReader`) against decoding every frame
   up to the last sampled one. Target: seeking at least 10x faster.
2. A folder of ``--videos`` generated 20 s videos, the b32 encoder with random weights, T = 8:
   decode only (the DataLoader workers), encode only (clips decoded beforehand), and both
   overlapped (``xclip-fast encode --workers N``). Target: overlapped within 20% of the slower one.

Writes ``extract.json`` and ``extract.txt`` (videos/s, frames/s) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_video(path, seconds: float) -> str:
    """25 fps, 160 x 120, a key frame every 4 s (typical of camera and web video)."""
    from xclip_fast.testing import write_video as write

    base = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    return write(path, int(seconds * 25), lambda i: np.roll(base, i, axis=1), rate=25, gop=100, width=160,
                 height=120)


def seek_vs_decode(folder: Path, minutes: float, frames: int = 8) -> dict:
    from xclip_fast.video import VideoReader

    t0 = time.perf_counter()
    path = write_video(folder / "long.mp4", minutes * 60)
    made = time.perf_counter() - t0
    result = {"video_minutes": minutes, "frames_sampled": frames, "generate_s": made}
    for seek in (True, False):
        t0 = time.perf_counter()
        with VideoReader(path) as reader:
            indices, _ = reader.sample(frames, seek=seek)
            decoded = reader.decoded
        result["seek" if seek else "full"] = {"seconds": time.perf_counter() - t0, "frames_decoded": decoded}
    result["frames_announced"] = max(indices) + 1
    result["speedup"] = result["full"]["seconds"] / result["seek"]["seconds"]
    return result


def throughput(folder: Path, videos: int, workers: int, frames: int = 8) -> dict:
    from xclip_fast import extract
    from xclip_fast.encoder import XCLIPVideoEncoder

    for i in range(videos):
        write_video(folder / f"clip{i:03d}.mp4", 20)
    jobs = extract.discover([str(folder)])
    jobs = [j for j in jobs if "clip" in j.path]
    encoder = XCLIPVideoEncoder.from_config("b32", num_frames=frames, backend="torch").eval()
    source = extract.ClipSource(jobs, frames, 224)

    t0 = time.perf_counter()
    clips = [m[3] for m in torch.utils.data.DataLoader(source, batch_size=None, num_workers=workers)
             if m[0] == "clip"]
    decode_s = time.perf_counter() - t0

    with torch.no_grad():
        encoder(clips[0][None])  # warm-up
        t0 = time.perf_counter()
        for clip in clips:
            encoder(clip[None])
        encode_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as out:
        ex = extract.Extractor(encoder, torch.device("cpu"), torch.float32, frames, 224, out_dir=out,
                               workers=workers, progress=False)
        t0 = time.perf_counter()
        ex.run(extract.prepare(jobs, out))
        both_s = time.perf_counter() - t0
    n = len(jobs)
    rates = {name: {"seconds": s, "videos_per_s": n / s, "frames_per_s": n * frames / s}
             for name, s in (("decode_only", decode_s), ("encode_only", encode_s), ("overlapped", both_s))}
    slower = min(rates["decode_only"]["videos_per_s"], rates["encode_only"]["videos_per_s"])
    return {"videos": n, "frames_per_video": frames, "workers": workers, **rates,
            "overlapped_over_slower": rates["overlapped"]["videos_per_s"] / slower}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        seek = seek_vs_decode(Path(tmp), args.minutes)
        rates = throughput(Path(tmp), args.videos, args.workers)
    result = {"environment": env, "seek_vs_full_decode": seek, "throughput": rates}
    (out / "extract.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"xclip-fast encode throughput - {env['machine']}, torch {env['torch']} ({env['threads']} threads) - "
        f"{env['date']}",
        f"seek vs full decode, T=8 from a {args.minutes:g}-minute video ({seek['frames_announced']} frames): "
        f"seek {seek['seek']['seconds']:.3f}s ({seek['seek']['frames_decoded']} frames decoded), full "
        f"{seek['full']['seconds']:.3f}s ({seek['full']['frames_decoded']} frames decoded): "
        f"{seek['speedup']:.1f}x (target >= 10x)",
        f"{rates['videos']} videos of 20 s, T=8, b32 random weights, CPU float32, --workers {args.workers}:",
    ]
    for name in ("decode_only", "encode_only", "overlapped"):
        r = rates[name]
        lines.append(f"  {name:12s} {r['seconds']:7.2f}s  {r['videos_per_s']:6.2f} videos/s  "
                     f"{r['frames_per_s']:7.1f} frames/s")
    lines.append(f"  overlapped / slower of the two: {rates['overlapped_over_slower']:.2f} (target >= 0.80)")
    (out / "extract.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
