"""What training keeps for the backward: held bytes, matmul FLOPs and host time of one CCT block and
of the encoder at every recompute level and memory budget against the original (eager, with
selective checkpointing, compiled, compiled under an activation memory budget), the CPU time of a
block, and the longest clip that trains in 80 and 141 GB; with ``--offload``, instead, what activation
offloading moves per block at every level.

    python benchmarks/training_memory.py [--out DIR] [--quick] [--offload] [--lora]

Held bytes: the tensor storages created by the forward and still alive after it (the output,
inputs and weights excluded), counted operator by operator (``xclip_fast.bench.memory``); for the
compiled original, the unique storages its graph saves for the backward. FLOPs: forward + backward,
matrix products and attention (``xclip_fast.bench.memory.flop_counter``; for compiled graphs, those
the partitioner made, run by ``counting_backend``). Host time: one block forward + backward at tiny
sizes (d = 64, 2 heads, T = 2, l = 5, one thread), where the arithmetic is negligible, against the
original in alternating rounds; aten operators per step counted (views excluded). Budgets: the
encoder at ``recompute=<fraction of what "none" holds>``, against the compiled original under
``torch._functorch.config.activation_memory_budget``; at the held fractions 0.30x and 0.10x of the
original, our matmul FLOPs against the compiled original's at the same held fraction (interpolated
between its measured budgets). Longest clip: batch 1, bf16 autocast (the GPU training setting, run
here on the CPU): bytes per frame from the held bytes at two frame counts plus one block's working
set in backward, and ``T_max = (capacity - 18 bytes x parameters) / bytes per frame`` (see
``longest_clip_table``). An extrapolation: no GPU ran it. Offloading: one block at B/32 and B/16 sizes
(T = 8, batch 1, bf16 autocast, run on the CPU) under saved-tensor hooks: the bytes they see (what
``save_on_cpu`` moves of the activations), those kept outside them (what stays on the GPU whatever
the hooks do), and what ``save_on_cpu`` copies in one forward, a tensor saved twice counted twice,
the parameters apart. With ``--lora``, instead: one block at B/32 sizes (T = 8, float32, ``lean``)
with PEFT LoRA (r = 16) on ``c_fc``/``c_proj`` and its base frozen, against the same block frozen
without LoRA (the same GEMMs but the update's) and trainable (full fine-tuning), and against the
adapters called as modules (how the MLP ran before LoRA was fused): held bytes, matmul FLOPs and
the CPU time of forward + backward in alternating rounds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from xclip_fast import reference
from xclip_fast.bench.measure import host_times, interleaved_times
from xclip_fast.bench.memory import CountingOffload, held_bytes, hooked_bytes, matmul_flops, saved_bytes
from xclip_fast.bench.memory import longest_clip as t_max
from xclip_fast.bench.results import markdown_table, section, write_report
from xclip_fast.bench.train import Trainer, save_matmuls
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.recompute import RECOMPUTE_LEVELS

MIB = 2**20
FAST = [f"xclip-fast-{level}" for level in RECOMPUTE_LEVELS]


def _step(fn):
    def run(x):
        y = fn(x)
        y.float().sum().backward()
    return run


def _median_ms(fns: dict, rounds: int) -> dict:
    """Median ms of one call of each callable, in alternating rounds of one call each."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, rounds, 0.0).items()}


def _blocks(l: int):
    """The original block and ours (torch backend, its weights) at B/32 or B/16 sizes (``l``
    tokens, T = 8, d = 768, 12 heads), and an input of one video."""
    torch.manual_seed(0)
    T, d, h = 8, 768, 12
    ref = reference.CrossFramelAttentionBlock(d, h, None, 0.0, T).train()
    fast = CrossFrameAttentionBlock(d, h, None, 0.0, T, backend="torch").train()
    fast.load_state_dict(ref.state_dict())
    return ref, fast, torch.randn(l, T, d, requires_grad=True)


def _at_level(block, name):
    """``block`` called at recompute level ``name``."""
    def run(x):
        block.recompute = name
        return block(x)
    return run


def _measured(variants: dict, x, keep, timed=(), rounds: int = 0) -> list[dict]:
    """Per variant (name -> ``fn(x)``): the MiB its forward holds for the backward (a compiled one:
    what its graph saves), the matmul FLOPs of forward + backward (not counted inside a compiled
    one) and, for the names in ``timed``, the median ms of forward + backward in alternating rounds."""
    rows = []
    for name, fn in variants.items():
        compiled = "compile" in name
        held = (saved_bytes if compiled else held_bytes)(fn, x, keep=keep)[1]
        rows.append(dict(variant=name, held_mib=held / MIB, flops=None if compiled else matmul_flops(_step(fn), x)))
    x.grad = None
    if timed:
        times = _median_ms({n: functools.partial(_step(variants[n]), x) for n in timed}, rounds)
        for r in rows:
            r["time_ms"] = times.get(r["variant"])
    return rows


def _ratios(rows: list[dict], base: dict, suffix: str = "", time_base: dict | None = None) -> list[dict]:
    """Held bytes, FLOPs (and with ``time_base``, time) of every row over ``base``'s (``time_base``'s):
    columns ``held_x<suffix>``, ``flops_x<suffix>``, ``time_x<suffix>``."""
    for r in rows:
        r["held_x" + suffix] = r["held_mib"] / base["held_mib"]
        r["flops_x" + suffix] = r["flops"] / base["flops"] if r["flops"] else None
        if time_base is not None:
            r["time_x" + suffix] = r["time_ms"] / time_base["time_ms"] if r["time_ms"] else None
    return rows


def block_table(l: int, rounds: int) -> list[dict]:
    ref, fast, x = _blocks(l)
    sac = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
    variants = {"original": ref,
                "original + selective checkpointing": lambda x: checkpoint(ref, x, use_reentrant=False, context_fn=sac),
                "original, torch.compile": torch.compile(ref),
                **{f"fast, recompute={k}": _at_level(fast, k) for k in RECOMPUTE_LEVELS}}
    rows = _measured(variants, x, [ref, fast], [n for n in variants if n.startswith("fast")], rounds)
    _ratios(rows, rows[0])
    none = next(r for r in rows if r["variant"] == "fast, recompute=none")
    for r in rows:
        r["time_x_none"] = r["time_ms"] / none["time_ms"] if r["time_ms"] else None
    return rows


def lora_table(l: int, rounds: int) -> list[dict]:
    import peft

    from xclip_fast.blocks import official_mlp

    torch.manual_seed(0)
    T, d, h = 8, 768, 12
    plain = CrossFrameAttentionBlock(d, h, None, 0.0, T, backend="torch", recompute="lean").train()
    trainable = plain
    frozen = CrossFrameAttentionBlock(d, h, None, 0.0, T, backend="torch", recompute="lean").train()
    frozen.load_state_dict(plain.state_dict())
    frozen.requires_grad_(False)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_fc", "c_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(CrossFrameAttentionBlock(d, h, None, 0.0, T, backend="torch", recompute="lean"),
                               config).train()
    inner = lora.base_model.model
    inner.load_state_dict({k: v for k, v in plain.state_dict().items()}, strict=False)
    assert official_mlp(inner.mlp).lora1 is not None  # fused

    class Called(torch.nn.Module):  # the adapters called as modules (a no-op hook makes the MLP unplain)
        def __init__(self):
            super().__init__()
            self.block = copy.deepcopy(lora)
            self.block.base_model.model.mlp.c_fc.register_forward_pre_hook(lambda m, a: None)

        def forward(self, x):
            return self.block(x)

    called = Called().train()
    x = torch.randn(l, T, d, requires_grad=True)
    variants = {"trainable, no LoRA": trainable, "frozen, no LoRA": frozen, "frozen + LoRA on the MLP (fused)": lora,
                "frozen + LoRA on the MLP, called as modules": called}
    rows = _measured(variants, x, [plain, frozen, lora, called], list(variants), rounds)
    return _ratios(rows, rows[1], "_frozen", time_base=rows[1])


def offload_table(l: int) -> list[dict]:
    """One block (l tokens, T = 8, d = 768, 12 heads, batch 1) under bf16 autocast, the original and
    every level: held bytes, the bytes the saved-tensor hooks see and those they do not, and what
    ``save_on_cpu`` copies (activations; parameters apart), in MiB."""
    ref, fast, x = _blocks(l)

    def autocast(fn):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x)
        return run

    variants = {"original": ref, **{f"fast, recompute={k}": _at_level(fast, k) for k in RECOMPUTE_LEVELS}}
    rows = []
    for name, fn in variants.items():
        fn = autocast(fn)
        held = held_bytes(fn, x, keep=[ref, fast])[1]
        hooked, outside = hooked_bytes(fn, x, keep=[ref, fast])[1:]
        offload = CountingOffload()
        with offload:
            out = fn(x)
        del out
        rows.append(dict(variant=name, held_mib=held / MIB, hooked_mib=hooked / MIB, outside_mib=outside / MIB,
                         moved_mib=(offload.moved - offload.parameters) / MIB,
                         moved_parameters_mib=offload.parameters / MIB))
    return rows


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that run, views excepted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def host_table(rounds: int) -> list[dict]:
    """Host time and aten operators of one block forward + backward at tiny sizes (d = 64, 2
    heads, T = 2, l = 5; float32, torch backend, one thread), every level against the original."""
    torch.manual_seed(0)
    d, h, T, l = 64, 2, 2, 5
    ref = reference.CrossFramelAttentionBlock(d, h, None, 0.0, T).train()
    fast = {level: CrossFrameAttentionBlock(d, h, None, 0.0, T, backend="torch", recompute=level).train()
            for level in RECOMPUTE_LEVELS}
    for block in fast.values():
        block.load_state_dict(ref.state_dict())
    x = torch.randn(l, T, d, requires_grad=True)
    g = torch.randn(l, T, d)
    sac = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
    variants = {"original": ref,
                "original + selective checkpointing": lambda x: checkpoint(ref, x, use_reentrant=False, context_fn=sac),
                **{f"fast, recompute={k}": fast[k] for k in ("none", "lean", "min", "block")}}

    def step(fn, params):
        def run():
            x.grad = None
            for p in params:
                p.grad = None
            fn(x).backward(g)
        return run

    fns = {name: step(fn, list((fast[name.split("=")[1]] if "=" in name else ref).parameters()))
           for name, fn in variants.items()}
    times = host_times(fns, torch.device("cpu"), rounds=rounds)
    rows = []
    for name, fn in fns.items():
        counter = _OpCounter()
        with counter:
            fn()
        ms, ratio = times[name]
        rows.append(dict(variant=name, host_ms=ms, host_x=ratio, aten_ops=counter.count))
    return rows


def _held_flops(tr: Trainer, video):
    """Held bytes (compiled: saved by the counting copy's graphs, the same partition) and FLOPs."""
    return tr.held(video, tr.counted), tr.flops(video)


def budget_table(model: str, T: int, quick: bool) -> tuple[list[dict], list[dict]]:
    """The encoder under memory budgets: ours (``recompute=<b>``, a fraction of what "none" holds)
    and the compiled original under ``activation_memory_budget`` (its graphs run by the counting
    backend), held bytes and FLOPs against the eager original's; then, at the held fractions 0.30x
    and 0.10x of the original, ours (the budget that gives it) against the compiled original's
    FLOPs at that held fraction (interpolated between its two nearest measured budgets)."""
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder.from_config(model, num_frames=T)
    r = enc.config["input_resolution"]
    video = torch.randn(1, T, 3, r, r)
    ref = Trainer("reference", enc, torch.device("cpu"), False)
    held0, flops0 = _held_flops(ref, video)
    rows = []

    def add(variant, held, flops, **extra):
        rows.append(dict(variant=variant, held_x=held / held0, flops_x=flops / flops0, **extra))

    compiled_budgets = (0.5, 0.3, 0.1) if quick else (0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
    for b in compiled_budgets:
        torch._dynamo.reset()
        tr = Trainer(f"reference-compiled-budget-{b}", enc, torch.device("cpu"), False)
        add(f"original, torch.compile, activation_memory_budget={b}", *_held_flops(tr, video))
        del tr
    fast = Trainer("xclip-fast-none", enc, torch.device("cpu"), False)
    none_held, none_flops = _held_flops(fast, video)
    add("fast, recompute=none", none_held, none_flops)
    for b in (0.8, 0.6, 0.45, 0.3, 0.2, 0.15):
        fast.modules.recompute = b
        add(f"fast, recompute={b}", *_held_flops(fast, video), levels=" ".join(fast.modules.plan_budget()))
    compiled = sorted((row["held_x"], row["flops_x"]) for row in rows if "compile" in row["variant"])
    targets = []
    for target in (0.30, 0.10):
        fast.modules.recompute = min(1.0, target * held0 / none_held)
        held, flops = _held_flops(fast, video)
        ours = dict(held_x=held / held0, flops_x=flops / flops0)
        theirs = _interpolate(compiled, ours["held_x"])
        targets.append(dict(target=target, budget=fast.modules.recompute, held_x=ours["held_x"],
                            flops_x=ours["flops_x"], compiled_flops_x=theirs,
                            levels=" ".join(fast.modules.plan_budget())))
    return rows, targets


def _interpolate(points: list, x: float) -> float | None:
    """Linear interpolation of ``(x, y)`` points (sorted by x) at ``x``; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return None


def _trainers(model: str, T: int, amp: bool, names):
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder.from_config(model, num_frames=T)
    return enc, {n: Trainer(n, enc, torch.device("cpu"), amp) for n in names}


def encoder_table(model: str, T: int) -> list[dict]:
    names = ["reference", "reference-sac", *FAST]
    enc, trainers = _trainers(model, T, False, names)
    r = enc.config["input_resolution"]
    rows = _measured({n: tr.loss for n, tr in trainers.items()}, torch.randn(1, T, 3, r, r),
                     [tr.modules for tr in trainers.values()])
    return _ratios(rows, rows[0])


def longest_clip_table(model: str, frames=(2, 4)) -> list[dict]:
    """Bytes per frame (bf16 autocast, batch 1) and the longest T that trains in 80 and 141 GB.

    Per frame: the slope of the bytes held after the forward between two frame counts (weights and
    their bf16 copies cancel out), plus the backward's working set: one original block's activations
    (what the recomputation of one block re-creates at most), the original's slope over its layers.
    Static: 18 bytes per parameter (fp32 weights, gradients, two AdamW states, the bf16 copies)."""
    names = ["reference", "reference-sac", *FAST]
    held = {n: [] for n in names}
    params = layers = None
    for T in frames:
        enc, trainers = _trainers(model, T, True, names)
        params, layers = sum(p.numel() for p in enc.parameters()), enc.config["layers"]
        r = enc.config["input_resolution"]
        video = torch.randn(1, T, 3, r, r)
        for name, tr in trainers.items():
            held[name].append(tr.held(video))
        del enc, trainers
    slope = {n: (b2 - b1) / (frames[1] - frames[0]) for n, (b1, b2) in held.items()}
    working = slope["reference"] / layers
    rows = []
    for name in names:
        per_frame = slope[name] + working
        row = dict(variant=name, model=model, held_mib_per_frame=slope[name] / MIB, mib_per_frame=per_frame / MIB)
        for gb in (80, 141):
            row[f"T_max_{gb}GB"] = t_max(per_frame, params, gb * 1e9)
        rows.append(row)
    for row in rows:
        row["x_original"] = row["T_max_80GB"] / rows[0]["T_max_80GB"]
        row["x_selective"] = row["T_max_80GB"] / rows[1]["T_max_80GB"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for results.md and results.json")
    p.add_argument("--quick", action="store_true", help="B/32 only, fewer timing rounds and budgets")
    p.add_argument("--offload", action="store_true", help="only what activation offloading moves per block")
    p.add_argument("--lora", action="store_true", help="only one block with LoRA on the MLP against without")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if args.offload:
        return write_report(*_offload(), args.out)
    if args.lora:
        rows = lora_table(50, rounds=5 if args.quick else 20)
        md = [f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float32", "",
              *section("One CCT block with LoRA (r=16) on c_fc/c_proj, B/32 sizes (l=50, T=8, d=768), "
                       "recompute=lean", rows,
                       ["variant", "held_mib", "held_x_frozen", "flops_x_frozen", "time_ms", "time_x_frozen"])]
        return write_report(md, {"torch": torch.__version__, "lora": rows}, args.out)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "host": [], "blocks": {}, "encoders": {},
           "budgets": {}, "longest_clip": {}}
    md = [f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float32 unless stated", ""]
    rows = host_table(rounds=30 if args.quick else 100)
    out["host"] = rows
    md += section("Host time of one block step, tiny sizes (d=64, 2 heads, T=2, l=5; one thread)", rows,
                  ["variant", "host_ms", "host_x", "aten_ops"])
    for tag, l in [("B/32", 50)] + ([] if args.quick else [("B/16", 197)]):
        rows = block_table(l, rounds=5 if args.quick else 15)
        out["blocks"][tag] = rows
        md += section(f"One CCT block, {tag} sizes (l={l}, T=8, d=768, 12 heads)", rows,
                      ["variant", "held_mib", "held_x", "flops_x", "time_ms", "time_x_none"])
    rows = encoder_table("b32", 8)
    out["encoders"]["b32"] = rows
    md += section("Whole encoder, B/32, T=8, batch 1", rows, ["variant", "held_mib", "held_x", "flops_x"])
    rows, targets = budget_table("b32", 8, args.quick)
    out["budgets"]["b32"] = dict(curve=rows, targets=targets)
    md += [*section("Memory budgets, whole encoder, B/32, T=8, batch 1 (against the eager original)", rows,
                    ["variant", "held_x", "flops_x", "levels"]),
           "At the original's held fractions 0.30x and 0.10x: ours (the budget that gives it) against the "
           "compiled original under activation_memory_budget at the same held fraction (interpolated):", "",
           markdown_table(targets, ["target", "budget", "held_x", "flops_x", "compiled_flops_x", "levels"]), ""]
    for model in ["b16"] + ([] if args.quick else ["l14"]):
        rows = longest_clip_table(model)
        out["longest_clip"][model] = rows
        md += section(f"Longest trainable clip, {model}, batch 1, bf16 autocast (extrapolated from CPU)", rows,
                      ["variant", "held_mib_per_frame", "mib_per_frame", "T_max_80GB", "T_max_141GB", "x_original",
                       "x_selective"])
    return write_report(md, out, args.out)


def _offload() -> tuple[list[str], dict]:
    out = {"torch": torch.__version__, "offload": {}}
    md = [f"torch {torch.__version__}, CPU, bf16 autocast", ""]
    for tag, l in [("B/32", 50), ("B/16", 197)]:
        rows = offload_table(l)
        out["offload"][tag] = rows
        md += section(f"Activation offloading, one CCT block, {tag} sizes (l={l}, T=8, d=768, 12 heads, batch 1), MiB",
                      rows,
                      ["variant", "held_mib", "hooked_mib", "outside_mib", "moved_mib", "moved_parameters_mib"])
    return md, out


if __name__ == "__main__":
    sys.exit(main())
