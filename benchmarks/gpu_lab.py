"""The kernel lab: what our kernels, one block step and one training step cost on this GPU, measured
without Python in the loop, in one run of at most 300 s on one H100/H200.

    python benchmarks/gpu_lab.py --out DIR            # on a GPU (also the step "lab" of gpu_check.sh)
    python benchmarks/gpu_lab.py --dry-run --out DIR  # anywhere: every section at tiny sizes on the CPU,
                                                      # our kernels in Triton's interpreter (CI runs it)

Sections, the most valuable first. Each case checks what is left of ``--budget`` before it starts
and is written out as it ends, so a run cut short (or stopped with SIGINT) keeps what it measured:

1. ceilings, measured here: the copy bandwidth (bytes read + written) and the dense bf16 matmul rate.
2. kernels, bf16: the frame attention at l = 50, 197, 257 patch tokens + the message token and N = 768,
   3072 sequences (frames x 12 heads of 64), forward and backward apart. Ours (``xclip_fast.attention``
   through autograd, and each of its kernels launched alone: ``ours/fwd`` and ``ours/bwd``, the
   one-launch backward) against SDPA's flash, cuDNN and efficient backends on the concatenated input (the
   concatenation and the slice included, as the original runs it) and on the patch tokens alone
   (``-alone``: one SDPA call over l tokens, what attention at that length costs without the token).
   GPU ms by CUDA-graph replay over rotating input sets (``xclip_fast/bench/gputime.py``), the host's
   ms per call apart; the backward is the forward + backward graph less the forward graph. TFLOP/s
   of the useful FLOPs (forward: 2 products over l x (l + 1); backward: 5; kernel rows: the products
   each kernel runs), and the HBM floor: the bytes each must move (in the output) at the measured copy
   bandwidth, over the time. Every provider's output and input gradients are checked against float32.
3. one block step (forward + backward, bf16, B/16 and B/32 sizes, batch 8, T = 8): the original eager
   and compiled, ours eager (triton and torch backends at the recompute levels none and lean, and
   ``backend="auto"`` at lean: what a user gets) and compiled (triton, auto): wall time (CUDA events
   around eager steps), the GPU's busy time (the profiler's kernel
   time per step) and idle fraction, the graph-replay time, the host time, and each provider's top
   kernels (profile.txt).
4. one training step of the B/16 encoder (T = 8, batch 8, fused AdamW, bf16 autocast): the original and
   ours at the default level: step time, busy and idle, MFU (the original's matmul FLOPs per second over
   the matmul rate of section 1).
5. kernels, fp16: as section 2.

Files under ``--out`` (at most 7: a GPU machine hands back 8): lab.json (everything, with the device,
versions, commit and date), kernels.csv, block.csv, train.csv, profile.txt, table.txt (the short
table, printed last). ``benchmarks/auto_table.py DIR`` turns lab.json into rows of the table from which
``backend="auto"`` chooses (``xclip_fast/auto_table.json``). Exit status: 0, 1 when a provider failed its
check or raised, 130 when stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
FILES = ("lab.json", "kernels.csv", "block.csv", "train.csv", "profile.txt", "table.txt")
KERNEL_FIELDS = ["dtype", "l", "N", "provider", "direction", "status", "gpu_ms", "p20_ms", "p80_ms", "host_ms",
                 "timing", "tflops", "floor_bytes", "floor_pct", "error", "tolerance", "input_sets", "reason"]
BLOCK_FIELDS = ["model", "provider", "status", "wall_ms", "busy_ms", "idle_pct", "graph_ms", "host_ms",
                "x_eager_original", "x_compiled_original", "error", "tolerance", "reason"]
TRAIN_FIELDS = ["model", "provider", "status", "step_ms", "busy_ms", "idle_pct", "host_ms", "tflops", "mfu_pct",
                "error", "tolerance", "reason"]


def sizes(dry: bool) -> dict:
    """The problem sizes: the issue's on a GPU, tiny ones on a dry run."""
    if dry:
        return dict(kernel_shapes=[(5, 2), (9, 4)], heads=2, head_dim=16, kernel_dtypes=("float32",),
                    later_dtypes=(), block_models={"tiny": (32, 2, 5)}, batch=1, frames=2, train_model="tiny")
    return dict(kernel_shapes=[(197, 3072), (50, 3072), (257, 3072), (197, 768), (50, 768), (257, 768)], heads=12,
                head_dim=64, kernel_dtypes=("bfloat16",), later_dtypes=("float16",),
                block_models={"b16": None, "b32": None}, batch=8, frames=8, train_model="b16")


class Lab:
    """One run: the device, the budget, the rows of each section and the files they go to."""

    def __init__(self, out: Path, budget: float, dry: bool):
        import torch

        from xclip_fast.bench.gputime import CPUTimer, GraphTimer
        from xclip_fast.bench.results import environment

        self.out, self.budget, self.dry = out, budget, dry
        self.start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
        self.cuda = self.device.type == "cuda"
        self.env = environment(self.device)
        if self.cuda:  # (the key of the rows benchmarks/auto_table.py makes of this run)
            major, minor = torch.cuda.get_device_capability(self.device)
            self.env["arch"] = 10 * major + minor
        self.timer = GraphTimer(self.device) if self.cuda else CPUTimer(rounds=3)
        self.sizes = sizes(dry)
        self.ceilings: dict = {}
        self.rows = {"kernels": [], "block": [], "train": []}
        self.profiles: list[str] = []
        self.notes: list[str] = []
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # a fresh run: nothing of an earlier one is mistaken for this one's
            (out / name).unlink(missing_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def wall_ms(self, fn) -> float:
        """The eager wall time of one call: CUDA events around eager calls (the host's gaps
        included, as a user's step has them); on a CPU the timer's wall time."""
        from xclip_fast.bench.measure import time_ms

        return time_ms(fn, self.device, quick=True)[0] if self.cuda else self.timer.gpu_ms([fn])[0]

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self):
        from xclip_fast.bench.measure import free

        free(self.device)

    def add(self, section: str, row: dict) -> None:
        """Keep a row and write every file again (a run stopped part-way keeps what it measured)."""
        self.rows[section].append(row)
        self.write()

    def write(self) -> None:
        for section, fields in (("kernels", KERNEL_FIELDS), ("block", BLOCK_FIELDS), ("train", TRAIN_FIELDS)):
            with open(self.out / f"{section}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({k: _csv(v) for k, v in r.items()} for r in self.rows[section])
        doc = {"environment": self.env, "dry_run": self.dry, "budget_s": self.budget,
               "sizes": {k: v for k, v in self.sizes.items() if k in ("heads", "head_dim", "batch", "frames")},
               "elapsed_s": round(time.perf_counter() - self.start, 1), "ceilings": self.ceilings,
               "notes": self.notes, **self.rows}
        (self.out / "lab.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (self.out / "profile.txt").write_text("\n".join(self.profiles) + "\n")


def _csv(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


# ------------------------------------------------------------------------------------------------
# 1. ceilings
# ------------------------------------------------------------------------------------------------
def ceilings(lab: Lab) -> None:
    import torch

    from xclip_fast.bench.kernels import l2_bytes
    from xclip_fast.bench.measure import copy_bandwidth

    c = lab.ceilings
    c["copy_gbps"] = copy_bandwidth(lab.device)
    if lab.cuda:
        from xclip_fast.bench.train import dense_bf16_tflops

        c["matmul_tflops"] = dense_bf16_tflops(lab.device)
        c["matmul"] = "bf16 8192^3"
        props = torch.cuda.get_device_properties(lab.device)
        c["sms"] = props.multi_processor_count
        c["l2_mib"] = (l2_bytes(lab.device) or 0) / 2**20
        c["cuda"] = torch.version.cuda
        c["driver"] = _driver()
    else:  # a dry run: the CPU's fp32 rate at a small size, so the MFU column is filled
        n = 256
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = lab.timer.measure([lambda: a @ b])
        c["matmul_tflops"] = 2 * n**3 / (t.ms * 1e-3) / 1e12
        c["matmul"] = f"fp32 {n}^3 (CPU)"
    lab.write()


def _driver() -> str:
    """The NVIDIA driver's version, from nvidia-smi (``unknown`` without it)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        out = ""
    return out.splitlines()[0] if out else "unknown"


# ------------------------------------------------------------------------------------------------
# 2. kernels
# ------------------------------------------------------------------------------------------------
class _Inputs:
    """One input set of a frame-attention shape: q, k, v ``(F, l, H, D)``, the message token's query,
    key and value ``(F, H, D)``, the output gradient; every tensor a leaf that requires grad."""

    def __init__(self, F, l, H, D, dtype, device, seed):
        import torch

        g = torch.Generator(device=device).manual_seed(seed)

        def t(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()

        self.q, self.k, self.v = t(F, l, H, D), t(F, l, H, D), t(F, l, H, D)
        self.q_msg, self.ek, self.ev = t(F, H, D), t(F, H, D), t(F, H, D)
        self.do = t(F, l, H, D).detach()

    def upcast(self):
        """The same values in float32 (the check's reference)."""
        import copy

        up = copy.copy(self)
        for name in ("q", "k", "v", "q_msg", "ek", "ev", "do"):
            setattr(up, name, getattr(self, name).detach().float().requires_grad_(name != "do"))
        return up


def _concat_attention(s, attend):
    """The original dataflow: the message token appended to q, k and v, one attention over l + 1
    tokens (``attend`` on (B, H, S, D)), the message token's row dropped."""
    import torch

    q = torch.cat([s.q, s.q_msg[:, None]], dim=1)
    k = torch.cat([s.k, s.ek[:, None]], dim=1)
    v = torch.cat([s.v, s.ev[:, None]], dim=1)
    return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)[:, : s.q.shape[1]]


def _sdpa(backend):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def kernel_providers() -> dict:
    """name -> (function of an input set -> output, the leaves it differentiates, the function it
    computes). The message token's query is no leaf of the check or the timing: its row is dropped,
    so its gradient is zero by construction (the original still computes that row)."""
    import xclip_fast

    full = ("q", "k", "v", "ek", "ev")
    providers = {"ours": (lambda s: xclip_fast.attention(s.q, s.k, s.v, s.ek, s.ev, backend="triton"),
                          full, "with the token")}
    for name, backend in SDPA_BACKENDS.items():
        attend = _sdpa(backend)
        providers[f"sdpa-{name}"] = (lambda s, a=attend: _concat_attention(s, a), full, "with the token")
        providers[f"sdpa-{name}-alone"] = (
            lambda s, a=attend: a(s.q.transpose(1, 2), s.k.transpose(1, 2), s.v.transpose(1, 2)).transpose(1, 2),
            ("q", "k", "v"), "tokens alone")
    return providers


def _truths(s):
    """float32 outputs and input gradients of both functions (with the token, tokens alone)."""
    import torch

    math_attend = _sdpa("MATH")
    up = s.upcast()
    truths = {}
    for what, fn, names in (("with the token", lambda u: _concat_attention(u, math_attend),
                             ("q", "k", "v", "ek", "ev")),
                            ("tokens alone", lambda u: math_attend(u.q.transpose(1, 2), u.k.transpose(1, 2),
                                                                   u.v.transpose(1, 2)).transpose(1, 2),
                             ("q", "k", "v"))):
        out = fn(up)
        grads = torch.autograd.grad(out, [getattr(up, n) for n in names], up.do)
        truths[what] = {"out": out.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}
    return truths


def _check(fn, names, s, truth, tol_dtype):
    """The provider's largest relative error (output and each input gradient) and its bound."""
    import torch

    from xclip_fast.testing import TOLERANCES, rel_err

    out = fn(s)
    grads = torch.autograd.grad(out, [getattr(s, n) for n in names], s.do)
    errors = {"out": rel_err(out.detach().float(), truth["out"])}
    errors.update({f"d{n}": rel_err(g.float(), truth[f"d{n}"]) for n, g in zip(names, grads)})
    worst = max(errors, key=errors.get)
    return errors[worst], worst, TOLERANCES[tol_dtype]


def kernel_section(lab: Lab, dtype_name: str) -> None:
    import torch

    from xclip_fast.bench.gputime import measure_or_profile, rotation
    from xclip_fast.bench.kernels import ATTENTION_KERNELS, l2_bytes, problems, time_kernels

    dtype = getattr(torch, dtype_name)
    z = lab.sizes
    H, D = z["heads"], z["head_dim"]
    copy_gbps = lab.ceilings.get("copy_gbps")
    for l, N in z["kernel_shapes"]:
        label = dict(dtype=dtype_name, l=l, N=N)
        if lab.left() < 20:
            lab.add("kernels", dict(**label, provider="*", status="skipped", reason="budget spent"))
            continue
        F = N // H
        elt = torch.finfo(dtype).bits // 8
        tok, extra = F * l * H * D * elt, F * H * D * elt
        sets_n = rotation(4 * tok, l2_bytes(lab.device))
        sets = [_Inputs(F, l, H, D, dtype, lab.device, seed) for seed in range(sets_n)]
        truths = _truths(sets[0])
        for name, (fn, names, what) in kernel_providers().items():
            alone = what == "tokens alone"
            fwd_flops = 4.0 * N * l * (l + (0 if alone else 1)) * D
            floors = {"fwd": 4 * tok + (0 if alone else 2 * extra), "bwd": 8 * tok + (0 if alone else 4 * extra)}
            base = dict(**label, provider=name, input_sets=sets_n)
            try:
                err, worst, tol = _check(fn, names, sets[0], truths[what], dtype)

                def fwdbwd(s, fn=fn, names=names):
                    return torch.autograd.grad(fn(s), [getattr(s, n) for n in names], s.do)
                t_fwd = measure_or_profile(lab.timer, [lambda s=s, fn=fn: fn(s) for s in sets], lab.device)
                t_all = measure_or_profile(lab.timer, [lambda s=s: fwdbwd(s) for s in sets], lab.device)
            except Exception as exc:
                status = "skipped" if "No available kernel" in str(exc) or "No viable backend" in str(exc) \
                    else "error"
                lab.add("kernels", dict(**base, direction="fwd+bwd", status=status, reason=_short(exc)))
                lab.sync()
                continue
            status = "ok" if err <= tol else "mismatch"
            check = dict(error=err, tolerance=tol, reason="" if status == "ok" else f"{worst}: {err:.2e} > {tol:.0e}")
            bwd_ms = t_all.ms - t_fwd.ms
            for direction, ms, p20, p80, host, flops in (
                    ("fwd", t_fwd.ms, t_fwd.p20, t_fwd.p80, t_fwd.host_ms, fwd_flops),
                    ("bwd", bwd_ms, None, None, t_all.host_ms, 2.5 * fwd_flops)):
                floor_ms = floors[direction] / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
                lab.add("kernels", dict(
                    **base, direction=direction, status=status, gpu_ms=ms, p20_ms=p20, p80_ms=p80, host_ms=host,
                    timing=t_fwd.how if direction == "fwd" else f"{t_all.how} (fwd+bwd less fwd)",
                    tflops=flops / (ms * 1e-3) / 1e12 if ms > 0 else None, floor_bytes=floors[direction],
                    floor_pct=100 * floor_ms / ms if floor_ms and ms > 0 else None, **check))
        del sets, truths
        lab.free()
        # each of our kernels launched alone, on buffers of its own (no autograd, no operator)
        probs = problems(F, l, H, D, dtype, lab.device, extra=True)
        try:
            timings = time_kernels(probs, ATTENTION_KERNELS, lab.timer, lab.device)
        except Exception as exc:
            lab.add("kernels", dict(**label, provider="ours/*", status="error", reason=_short(exc)))
            timings = {}
        for kernel, t in timings.items():
            base = dict(**label, provider=f"ours/{kernel}", direction="fwd" if kernel.endswith("fwd") else "bwd",
                        input_sets=len(probs))
            flops, nbytes = probs[0].flops(kernel), probs[0].bytes(kernel)
            floor_ms = nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
            lab.add("kernels", dict(**base, status="ok", gpu_ms=t.ms, p20_ms=t.p20, p80_ms=t.p80, host_ms=t.host_ms,
                                    timing=t.how, tflops=flops / (t.ms * 1e-3) / 1e12 if flops else None,
                                    floor_bytes=nbytes, floor_pct=100 * floor_ms / t.ms if floor_ms else None,
                                    reason="launched alone; TFLOP/s of the products it runs"))
        del probs
        lab.free()


# ------------------------------------------------------------------------------------------------
# 3. one block step
# ------------------------------------------------------------------------------------------------
BLOCK_PROVIDERS = ("original", "original-compiled", "triton-none", "triton-lean", "torch-none", "torch-lean",
                   "auto-lean", "triton-compiled", "auto-compiled")


def _block_dims(lab: Lab, model: str):
    from xclip_fast.bench.cases import model_dims

    dims = lab.sizes["block_models"][model]
    return dims if dims is not None else model_dims(model)


def block_section(lab: Lab, model: str) -> None:
    import torch

    from xclip_fast import reference
    from xclip_fast.bench.gputime import kernel_table
    from xclip_fast.bench.results import Skip
    from xclip_fast.blocks import CrossFrameAttentionBlock
    from xclip_fast.testing import TOLERANCES, rel_err

    width, heads, l = _block_dims(lab, model)
    z = lab.sizes
    T, b = z["frames"], z["batch"]
    dtype = torch.bfloat16 if lab.cuda else torch.float32
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(width, heads, T=T).to(lab.device)
    x32 = torch.randn(l, b * T, width, device=lab.device)
    g32 = torch.randn(l, b * T, width, device=lab.device)
    # the float32 truth: output and input gradient of the original
    xt = x32.clone().requires_grad_()
    out = ref(xt)
    out.backward(g32)
    truth = {"out": out.detach(), "dx": xt.grad}
    ref = ref.to(dtype)
    x, g = x32.to(dtype).requires_grad_(), g32.to(dtype)

    def make(name):
        """(the module whose gradients a step clears, the callable a step runs)."""
        if name.startswith("original"):
            module = ref
        else:
            backend, level = name.split("-")
            level = "lean" if level == "compiled" else level
            module = CrossFrameAttentionBlock(width, heads, T=T, backend=backend, recompute=level)
            module.load_state_dict(ref.state_dict())
            module = module.to(lab.device, dtype)
        if name.endswith("compiled"):
            if lab.dry:
                raise Skip("compiling on a CPU takes minutes (the dry run walks the eager steps)")
            return module, torch.compile(module, dynamic=False)
        return module, module

    rows = {}
    for name in BLOCK_PROVIDERS:
        row = dict(model=model, provider=name)
        if lab.left() < 15:
            lab.add("block", dict(row, status="skipped", reason="budget spent"))
            continue
        try:
            module, fn = make(name)
        except Exception as exc:
            status = "skipped" if isinstance(exc, Skip) else "error"
            lab.add("block", dict(row, status=status, reason=str(exc) if status == "skipped" else _short(exc)))
            continue
        params = list(module.parameters())

        def step(fn=fn, params=params):
            x.grad = None
            for p in params:
                p.grad = None
            fn(x).backward(g)

        try:
            x.grad = None
            out = fn(x)
            out.backward(g)
            errors = {"out": rel_err(out.detach().float(), truth["out"]), "dx": rel_err(x.grad.float(), truth["dx"])}
            del out
            ref_err = rows["original"]["error"] if "original" in rows and rows["original"].get("error") else 0.0
            tol = max(TOLERANCES[dtype], 2 * ref_err)
            worst = max(errors, key=errors.get)
            row.update(error=errors[worst], tolerance=tol, status="ok" if errors[worst] <= tol else "mismatch",
                       reason="" if errors[worst] <= tol else f"{worst}: {errors[worst]:.2e} > {tol:.0e}")
            row["wall_ms"] = lab.wall_ms(step)
            row["host_ms"] = lab.timer.host_ms(step)
            table = kernel_table(step, lab.device)
            row["busy_ms"] = table["busy_ms"]
            row["idle_pct"] = max(0.0, 100 * (1 - table["busy_ms"] / row["wall_ms"])) if lab.cuda else None
            _profile(lab, f"block {model} {name}", table, row["wall_ms"])
            try:
                row["graph_ms"] = lab.timer.gpu_ms([step])[0]
            except Exception as exc:
                lab.sync()
                row["graph_ms"] = None
                row["reason"] = (row["reason"] + "; " if row["reason"] else "") + f"no graph: {_short(exc)}"
        except Exception as exc:
            row.update(status="error", reason=_short(exc))
            lab.sync()
        finally:
            x.grad = None
            for p in params:
                p.grad = None
        rows[name] = row
        for other, key in (("original", "x_eager_original"), ("original-compiled", "x_compiled_original")):
            base = rows.get(other, {}).get("wall_ms")
            if base and row.get("wall_ms"):
                row[key] = base / row["wall_ms"]
        lab.add("block", row)
        lab.free()


def _profile(lab: Lab, title: str, table: dict, wall_ms: float, top: int = 8) -> None:
    """The top kernels of one step: name, calls, total us, share of the step's wall time."""
    lines = [f"== {title}: wall {wall_ms:.3f} ms, device busy {table['busy_ms']:.3f} ms"
             f"{'' if lab.cuda else ' (CPU: operators self time)'}",
             f"   {'us/step':>9s} {'share':>6s} {'calls':>6s}  kernel"]
    for k in table["kernels"][:top]:
        share = 100 * k["us"] / (wall_ms * 1e3) if wall_ms else 0.0
        lines.append(f"   {k['us']:9.1f} {share:5.1f}% {k['calls']:6.1f}  {k['name'][:110]}")
    rest = table["kernels"][top:]
    if rest:
        lines.append(f"   {sum(k['us'] for k in rest):9.1f}        {len(rest):6d}  (the other kernels)")
    lab.profiles += lines + [""]


# ------------------------------------------------------------------------------------------------
# 4. one training step
# ------------------------------------------------------------------------------------------------
def train_section(lab: Lab) -> None:
    import functools

    import torch

    from xclip_fast.bench.gputime import kernel_table
    from xclip_fast.bench.train import TINY, Trainer
    from xclip_fast.encoder import XCLIPVideoEncoder
    from xclip_fast.testing import TOLERANCES, rel_err

    model = lab.sizes["train_model"]
    z = lab.sizes
    torch.manual_seed(0)
    if model == "tiny":
        enc = XCLIPVideoEncoder(**TINY)
    else:
        enc = XCLIPVideoEncoder.from_config(model, num_frames=z["frames"])
    r = enc.config["input_resolution"]
    video = torch.randn(z["batch"], enc.config["num_frames"], 3, r, r,
                        generator=torch.Generator().manual_seed(1)).to(lab.device)
    truth, ref_flops = None, None
    for name in ("reference", "xclip-fast-lean"):
        row = dict(model=model, provider="original" if name == "reference" else name)
        if lab.left() < 20:
            lab.add("train", dict(row, status="skipped", reason="budget spent"))
            continue
        try:
            tr = Trainer(name, enc, lab.device, lab.cuda)
            loss, grads = tr.grads(video)
            if truth is None:
                truth = (loss, grads)
                ref_flops = tr.flops(video)
            err = max(rel_err(loss, truth[0]), rel_err(grads, truth[1]))
            tol = TOLERANCES[torch.bfloat16 if lab.cuda else torch.float32]
            del grads
            row.update(error=err, tolerance=tol, status="ok" if err <= tol else "mismatch",
                       reason="" if err <= tol else f"loss/gradients: {err:.2e} > {tol:.0e}")
            step = functools.partial(tr.step, video)
            row["step_ms"] = lab.wall_ms(step)
            row["host_ms"] = lab.timer.host_ms(step)
            table = kernel_table(step, lab.device, calls=2)
            row["busy_ms"] = table["busy_ms"]
            row["idle_pct"] = max(0.0, 100 * (1 - table["busy_ms"] / row["step_ms"])) if lab.cuda else None
            _profile(lab, f"train {model} {row['provider']}", table, row["step_ms"])
            row["tflops"] = ref_flops / (row["step_ms"] * 1e-3) / 1e12
            rate = lab.ceilings.get("matmul_tflops")
            row["mfu_pct"] = 100 * row["tflops"] / rate if rate else None
            del tr
        except Exception as exc:
            row.update(status="error", reason=_short(exc))
            lab.sync()
        lab.add("train", row)
        lab.free()


# ------------------------------------------------------------------------------------------------
# the short table
# ------------------------------------------------------------------------------------------------
def _f(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def _model_table(title: str, rows: list[dict], cols) -> list[str]:
    """The lines of the block's or the training step's table: ``cols`` as (header, key, format, width);
    a row that did not run says why."""
    lines = ["", title, f"{'model':6s} {'provider':18s} " + " ".join(f"{h:>{w}s}" for h, _, _, w in cols)]
    for r in rows:
        start = f"{r['model']:6s} {r['provider']:18s} "
        if r.get("status") != "ok":
            lines.append(start + f"{r['status'].upper()}: {r.get('reason', '')}")
        else:
            lines.append(start + " ".join(f"{_f(r.get(key), spec):>{w}s}" for _, key, spec, w in cols))
    return lines


def summary(lab: Lab, interrupted: bool) -> str:
    e, c = lab.env, lab.ceilings
    lines = [f"xclip-fast lab - {e['device']} - torch {e['torch']}, triton {e['triton']} - commit {e['commit']} - "
             f"{e['timestamp']}{' - DRY RUN (CPU, tiny sizes)' if lab.dry else ''}",
             f"ceilings: copy {_f(c.get('copy_gbps'), '.0f')} GB/s (read + write), "
             f"matmul {_f(c.get('matmul_tflops'), '.1f')} TFLOP/s ({c.get('matmul', '-')}); "
             f"{time.perf_counter() - lab.start:.0f} s of {lab.budget:.0f}"
             f"{'; STOPPED before the end' if interrupted else ''}"]
    if "driver" in c:
        lines.append(f"device: {c.get('sms')} SMs, L2 {_f(c.get('l2_mib'), '.0f')} MiB, CUDA {c.get('cuda')}, "
                     f"driver {c.get('driver')}")
    rows = [r for r in lab.rows["kernels"] if r.get("status") == "ok"]
    if rows:
        lines += ["", "kernels: GPU ms by graph replay (bwd: fwd+bwd less fwd); %floor: the HBM floor over the time; "
                  "host: the host's ms per call (bwd: per fwd+bwd); x: the best SDPA on the concatenation over ours; "
                  "alone: the best SDPA on the l tokens alone",
                  f"{'dtype':9s} {'l':>4s} {'N':>5s} {'dir':4s} {'ours':>7s} {'%floor':>6s} {'host':>6s}  "
                  f"{'best SDPA concat':22s} {'x':>5s}  {'best alone':20s}  ours' kernels alone"]
        shapes = sorted({(r["dtype"], r["l"], r["N"]) for r in rows}, key=lambda s: (s[0], -s[2], s[1]))
        for dtype, l, N in shapes:
            for direction in ("fwd", "bwd"):
                of = {r["provider"]: r for r in rows if (r["dtype"], r["l"], r["N"], r["direction"])
                      == (dtype, l, N, direction)}
                ours = of.get("ours")

                def best(suffix, of=of):
                    cands = [(r["gpu_ms"], p) for p, r in of.items() if p.startswith("sdpa-") and
                             p.endswith("-alone") == (suffix == "alone")]
                    return min(cands) if cands else None
                concat, alone = best("concat"), best("alone")
                kernels = " ".join(f"{p.split('/')[1]} {r['gpu_ms']:.3f}" for p, r in of.items() if "/" in p)
                ratio = concat[0] / ours["gpu_ms"] if concat and ours and ours["gpu_ms"] > 0 else None
                lines.append(
                    f"{dtype:9s} {l:4d} {N:5d} {direction:4s} {_f(ours and ours['gpu_ms']):>7s} "
                    f"{_f(ours and ours.get('floor_pct'), '.0f'):>5s}% {_f(ours and ours.get('host_ms')):>6s}  "
                    f"{(f'{concat[0]:.3f} ' + concat[1].removeprefix('sdpa-')) if concat else '-':22s} "
                    f"{_f(ratio, '.2f'):>5s}  "
                    f"{(f'{alone[0]:.3f} ' + alone[1].removeprefix('sdpa-')) if alone else '-':20s}  {kernels}")
    if lab.rows["block"]:
        lines += _model_table(
            "block step, forward + backward (ms): wall = eager with CUDA events; busy = the profiler's kernel time; "
            "graph = CUDA-graph replay; x = the original's wall time over this one's", lab.rows["block"],
            [("wall", "wall_ms", ".3f", 7), ("busy", "busy_ms", ".3f", 7), ("idle%", "idle_pct", ".0f", 6),
             ("graph", "graph_ms", ".3f", 7), ("host", "host_ms", ".3f", 7), ("x eager", "x_eager_original", ".2f", 7),
             ("x comp", "x_compiled_original", ".2f", 7)])
    if lab.rows["train"]:
        lines += _model_table(
            f"training step (encoder, {'fused AdamW, bf16 autocast' if lab.cuda else 'AdamW, float32 on a CPU'}; "
            "MFU: the original's FLOPs per second over the matmul rate above)", lab.rows["train"],
            [("step ms", "step_ms", ".3f", 8), ("busy", "busy_ms", ".3f", 8), ("idle%", "idle_pct", ".0f", 6),
             ("host", "host_ms", ".3f", 7), ("MFU%", "mfu_pct", ".1f", 6)])
    bad = [r for rows in lab.rows.values() for r in rows if r.get("status") in ("error", "mismatch")]
    skipped = [r for rows in lab.rows.values() for r in rows if r.get("status") == "skipped"]
    lines += ["", f"{len(bad)} failed, {len(skipped)} skipped (reasons in the CSV files)"]
    for r in bad:
        where = " ".join(str(r.get(k)) for k in ("dtype", "l", "N", "model", "provider") if r.get(k) is not None)
        lines.append(f"  {r['status'].upper()} {where}: {r.get('reason', '')}")
    return "\n".join(lines)


def run(out: Path, budget: float, dry: bool) -> int:
    lab = Lab(out, budget, dry)
    interrupted = False
    try:
        ceilings(lab)
        for dtype in lab.sizes["kernel_dtypes"]:
            kernel_section(lab, dtype)
        for model in lab.sizes["block_models"]:
            block_section(lab, model)
        train_section(lab)
        for dtype in lab.sizes["later_dtypes"]:
            kernel_section(lab, dtype)
    except KeyboardInterrupt:  # a time limit's SIGINT: the table of what finished
        interrupted = True
    text = summary(lab, interrupted)
    lab.write()
    (out / "table.txt").write_text(text + "\n")
    print(text)
    if interrupted:
        return 130
    return 1 if any(r.get("status") in ("error", "mismatch") for rows in lab.rows.values() for r in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="lab-results", help="folder for the lab's files (at most 7)")
    parser.add_argument("--budget", type=float, default=280.0, help="seconds for all sections (default 280)")
    parser.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_lab.py needs a CUDA GPU (--dry-run walks every section on the CPU)", file=sys.stderr)
            return 2
    else:  # our kernels in Triton's interpreter: decided before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped either way: keep what finished
    return run(Path(args.out), args.budget, dry)


if __name__ == "__main__":
    sys.exit(main())
