"""Frame parallelism on CPU processes (gloo): memory per process, bytes per exchange, and the
longest clip that trains on W GPUs.

    python benchmarks/frame_parallel.py [--out DIR] [--quick] [--hf]

Each measurement runs in W processes (W = 2 and 4, ``torch.multiprocessing`` + gloo) and in one
process (W = 1, no frame parallelism) on the same clip:

- **Held bytes per process**: the storages the forward creates and keeps for the backward
  (``xclip_fast.bench.memory.held_bytes``, the method of ``training_memory.py``), float32, batch 1,
  ``recompute="lean"``; the target is at most ``1/W`` of one process's, plus 5%.
- **Bytes per exchange**: the functional collectives of one forward + backward, counted as they run
  (``CollectiveCounter``), bf16 autocast: per CCT layer one all-gather (each process puts in its
  ``(b, T/W, d)`` rows) and, in backward, one reduce-scatter (of the whole clip's ``(b, T, d)``
  gradient); one more of each for the MIT input ``(b, T, E)``.
- **Longest clip on W GPUs** (extrapolated, like ``training_memory.py``'s table): bytes per frame
  of the clip held on each process, from the held bytes at two clip lengths, bf16 autocast, W = 1
  and W = 2: ``s_W = s_1 / W + r``, where ``r = s_2 - s_1 / 2`` is what every process holds for the
  whole clip (the message path and the MIT run on all frames). With the backward's working set of
  one original block on the process's frames and 18 bytes per parameter (a full replica),
  ``T_max(W) = (capacity - 18 P) / (s_1 / W + r + working / W)``.

``--hf``: the same for a whole Hugging Face ``XCLIPModel`` (vision tower, MIT, prompt generator and
text tower; transformers' default configuration, which is X-CLIP B/32, and B/16 with 16-pixel
patches; random weights), patched, one video and 8 captions of 77 tokens, the loss a cross-entropy
over the 8 logits. Held bytes at W = 1 and 2 (float32, ``lean``, T = 8), the text tower's
(``get_text_features``, the same on every process) stated apart: the target is that the rest, per
process, is at most ``1/W`` of one process's plus 5%. Longest clip: as above, with the unpatched
model's slope as the original (its share of one layer the backward's working set) and the
intercept of the held bytes (what does not grow with T: the text tower, the captions' prompts)
added to the static bytes: ``T_max(W) = (capacity - 18 P - c_W) / (s_1 / W + r + working / W)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xclip_fast.bench.memory import CollectiveCounter, held_bytes, longest_clip
from xclip_fast.bench.results import section, write_report
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.parallel import FrameParallel

MIB = 2**20
LEVELS = ("lean", "min", "block")


def _encoder(model: str) -> XCLIPVideoEncoder:
    torch.manual_seed(0)
    return XCLIPVideoEncoder.from_config(model, recompute="lean").train()


def _video(enc: XCLIPVideoEncoder, T: int) -> torch.Tensor:
    r = enc.config["input_resolution"]
    return torch.randn(1, T, 3, r, r, generator=torch.Generator().manual_seed(1))


def _held(enc, video, fp, amp: bool) -> int:
    def forward(v):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return enc(v, frame_parallel=fp).float().square().sum()

    return held_bytes(forward, video if fp is None else video[:, fp.frames], keep=[enc])[1]


def measure(fp: FrameParallel | None, quick: bool) -> dict:
    """Everything one process measures (``fp`` None: one process, the whole clip)."""
    out = {"held_f32": {}, "slopes": {}, "collectives": {}}
    models = ["b32"] if quick else ["b32", "b16"]
    for model in models:
        enc = _encoder(model)
        out["held_f32"][model] = _held(enc, _video(enc, 8), fp, amp=False)
    for model in ["b16"] + ([] if quick else ["l14"]):
        if fp is not None and fp.world_size > 2:
            break  # (the clip lengths 2 and 4 are measured on W = 1 and 2)
        enc = _encoder(model)
        out["params", model] = sum(p.numel() for p in enc.parameters())
        for level in LEVELS:
            enc.recompute = level
            out["slopes"][model, level] = [_held(enc, _video(enc, T), _scaled(fp, T), amp=True) for T in (2, 4)]
    if fp is not None:
        enc = _encoder("b16")
        video = _video(enc, fp.num_frames)
        counter = CollectiveCounter()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            enc(video[:, fp.frames], frame_parallel=fp).float().square().sum().backward()
        out["collectives"] = dict(calls=counter.calls, bytes=counter.bytes, T=fp.num_frames, b=1)
    return out


def _scaled(fp: FrameParallel | None, T: int) -> FrameParallel | None:
    return None if fp is None else FrameParallel(T, fp.group)


# ------------------------------------------------------------------------------------------------
# the whole Hugging Face XCLIPModel (--hf)
# ------------------------------------------------------------------------------------------------
CAPTIONS, TOKENS = 8, 77


def _hf_model(model: str, patched: bool = True, num_frames: int = 8):
    from transformers import XCLIPConfig, XCLIPModel

    import xclip_fast

    torch.manual_seed(0)
    config = XCLIPConfig(vision_config=dict(patch_size=32 if model == "b32" else 16, num_frames=num_frames))
    m = XCLIPModel(config).train()
    return xclip_fast.patch_xclip(m, recompute="lean") if patched else m


def _hf_held(model, T: int, fp, amp: bool, text_only: bool = False) -> int:
    g = torch.Generator().manual_seed(1)
    video = torch.randn(1, T, 3, 224, 224, generator=g)
    ids = torch.randint(0, model.config.text_config.vocab_size, (CAPTIONS, TOKENS), generator=g)
    extra = {} if fp is None else {"frame_parallel": fp}

    def forward(v):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if text_only:
                return model.get_text_features(input_ids=ids).pooler_output.float().sum()
            logits = model(input_ids=ids, pixel_values=v, **extra).logits_per_video.float()
        return torch.nn.functional.cross_entropy(logits, torch.zeros(1, dtype=torch.long))

    return held_bytes(forward, video if fp is None else video[:, fp.frames], keep=[model])[1]


def measure_hf(fp: FrameParallel | None, quick: bool) -> dict:
    """Everything one process measures for ``--hf`` (``fp`` None: one process, the whole clip)."""
    from xclip_fast.hf import set_recompute

    out = {"held_f32": {}, "text_f32": {}, "slopes": {}, "params": {}}
    for model in ["b32"] if quick else ["b32", "b16"]:
        m = _hf_model(model)
        out["params"][model] = sum(p.numel() for p in m.parameters())
        out["held_f32"][model] = _hf_held(m, 8, fp, amp=False)
        out["text_f32"][model] = _hf_held(m, 8, None, amp=False, text_only=True)
        if fp is not None and fp.world_size > 2:
            continue
        for level in LEVELS:
            set_recompute(m, level)
            out["slopes"][model, level] = [_hf_held(m, T, _scaled(fp, T), amp=True) for T in (2, 4)]
        if fp is None:  # the original (built for each T: it runs its configured frame count only)
            out["slopes"][model, "original"] = [_hf_held(_hf_model(model, False, T), T, None, amp=True)
                                                for T in (2, 4)]
    return out


def hf_tables(one: dict, many: dict[int, dict], widths=(1, 2, 8)) -> dict:
    held = []
    for model, h1 in one["held_f32"].items():
        text = one["text_f32"][model]
        for W, r in sorted(many.items()):
            rest = r["held_f32"][model] - text
            held.append(dict(model=model, W=W, held_mib=r["held_f32"][model] / MIB, text_tower_mib=text / MIB,
                             rest_mib=rest / MIB, one_process_rest_over_W_mib=(h1 - text) / W / MIB,
                             ratio=rest / ((h1 - text) / W)))
    longest = []
    for (model, level), (h2, h4) in one["slopes"].items():
        s1 = (h4 - h2) / 2
        o2, o4 = one["slopes"][model, "original"]
        working = (o4 - o2) / 2 / 12  # one original layer's share of a frame (12 layers in both models)
        row = dict(model=model, variant="original" if level == "original" else f"xclip-fast-{level}",
                   held_mib_per_frame=s1 / MIB, constant_mib=(h2 - 2 * s1) / MIB)
        if level != "original":
            a2, b2 = many[2]["slopes"][model, level]
            r = (b2 - a2) / 2 - s1 / 2
            c2 = a2 - 2 * ((b2 - a2) / 2)
            row["every_process_mib_per_frame"] = r / MIB
        for W in widths if level != "original" else (1,):
            per_frame = s1 / W + (max(r, 0.0) if W > 1 else 0.0) + working / W
            constant = max(h2 - 2 * s1, c2 if W > 1 else 0.0, 0.0)
            row[f"T_max_80GB_W{W}"] = longest_clip(per_frame, one["params"][model], constant=constant)
        longest.append(row)
    return dict(held=held, longest=longest)


def _hf_main(args) -> int:
    one = measure_hf(None, args.quick)
    many = {W: _in_processes(W, args.quick, hf=True) for W in (2,)}
    many[1] = one
    t = hf_tables(one, many)
    md = [f"torch {torch.__version__}, CPU, gloo, one thread per process; whole XCLIPModel (patched), one video "
          f"and {CAPTIONS} captions of {TOKENS} tokens", "",
          *section("Held bytes per process after the forward (float32, recompute=lean, T=8), text tower apart",
                   t["held"],
                   ["model", "W", "held_mib", "text_tower_mib", "rest_mib", "one_process_rest_over_W_mib", "ratio"]),
          *section("Longest trainable clip per 80 GB GPU, whole model, batch 1, bf16 autocast (extrapolated from CPU)",
                   t["longest"],
                   ["model", "variant", "held_mib_per_frame", "every_process_mib_per_frame", "constant_mib",
                    "T_max_80GB_W1", "T_max_80GB_W2", "T_max_80GB_W8"])]
    return write_report(md, dict(torch=torch.__version__, **t), args.out)


def _worker(rank: int, world: int, store: str, out: str, quick: bool, hf: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = (measure_hf if hf else measure)(FrameParallel(8), quick)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _in_processes(world: int, quick: bool, hf: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), out, quick, hf), nprocs=world, join=True)
        return torch.load(out)


def tables(one: dict, many: dict[int, dict]) -> dict:
    held = [dict(model=model, W=W, held_mib=r["held_f32"][model] / MIB,
                 one_process_over_W_mib=one["held_f32"][model] / W / MIB,
                 ratio=r["held_f32"][model] / (one["held_f32"][model] / W))
            for model in one["held_f32"] for W, r in sorted(many.items())]
    comm = []
    for W, r in sorted(many.items()):
        c = r["collectives"]
        comm.append(dict(W=W, model="b16", T=c["T"], b=c["b"], all_gathers=c["calls"].get("all_gather_into_tensor"),
                         all_gather_bytes=c["bytes"].get("all_gather_into_tensor"),
                         reduce_scatters=c["calls"].get("reduce_scatter_tensor"),
                         reduce_scatter_bytes=c["bytes"].get("reduce_scatter_tensor")))
    longest = []
    for (model, level), (h2, h4) in one["slopes"].items():
        s1 = (h4 - h2) / 2  # bytes per clip frame, one process
        a2, b2 = many[2]["slopes"][model, level]
        longest.append(dict(model=model, variant=f"xclip-fast-{level}", s1=s1, r=(b2 - a2) / 2 - s1 / 2,
                            params=one["params", model]))
    return dict(held=held, comm=comm, longest=longest)


def longest_table(rows: list[dict], original_per_frame: dict, layers: dict, widths=(1, 2, 8)) -> list[dict]:
    """``T_max`` in 80 GB per GPU for each W (see the module doc); ``original_per_frame``: the
    original's held bytes per frame (from ``training_memory.py``'s results), whose share of one
    layer is the backward's working set."""
    out = []
    for row in rows:
        working = original_per_frame[row["model"]] / layers[row["model"]]
        new = dict(model=row["model"], variant=row["variant"], held_mib_per_frame=row["s1"] / MIB,
                   every_process_mib_per_frame=row["r"] / MIB)
        for W in widths:
            per_frame = row["s1"] / W + (max(row["r"], 0.0) if W > 1 else 0.0) + working / W
            new[f"T_max_80GB_W{W}"] = longest_clip(per_frame, row["params"])
        out.append(new)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for results.md and results.json")
    p.add_argument("--quick", action="store_true", help="held bytes of B/32, clip lengths of B/16, W = 2 only")
    p.add_argument("--training-memory", default=os.path.join(os.path.dirname(__file__), "results",
                                                               "cpu-training-memory-2026-12-03", "results.json"),
                   help="training_memory.py's results.json (the original's bytes per frame)")
    p.add_argument("--hf", action="store_true", help="the whole Hugging Face XCLIPModel instead of the encoder")
    args = p.parse_args(argv)
    if args.hf:
        return _hf_main(args)
    one = measure(None, args.quick)
    many = {W: _in_processes(W, args.quick) for W in ((2,) if args.quick else (2, 4))}
    t = tables(one, many)
    with open(args.training_memory) as f:
        ref = json.load(f)["longest_clip"]
    original = {m: rows[0]["held_mib_per_frame"] * MIB for m, rows in ref.items()}
    layers = {"b16": 12, "l14": 24}
    longest = longest_table([r for r in t["longest"] if r["model"] in original], original, layers)
    md = [f"torch {torch.__version__}, CPU, gloo, one thread per process; batch 1", "",
          *section("Held bytes per process after the forward (float32, recompute=lean, T=8)", t["held"],
                   ["model", "W", "held_mib", "one_process_over_W_mib", "ratio"]),
          *section("Collectives of one forward + backward (B/16, bf16 autocast, counted on process 0)", t["comm"],
                   ["W", "model", "T", "b", "all_gathers", "all_gather_bytes", "reduce_scatters",
                    "reduce_scatter_bytes"]),
          *section("Longest trainable clip per 80 GB GPU, batch 1, bf16 autocast (extrapolated from CPU)", longest,
                   ["model", "variant", "held_mib_per_frame", "every_process_mib_per_frame", "T_max_80GB_W1",
                    "T_max_80GB_W2", "T_max_80GB_W8"])]
    return write_report(md, dict(torch=torch.__version__, held=t["held"], comm=t["comm"], longest=longest), args.out)


if __name__ == "__main__":
    sys.exit(main())
