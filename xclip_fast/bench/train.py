"""The training level of ``xclip-fast bench``: the whole encoder, forward + backward + AdamW step.

Providers: the original modules eager (``reference``), with PyTorch's selective activation
checkpointing keeping matmul and attention outputs per block (``reference-sac``), compiled
(``reference-compiled``), compiled under ``torch._functorch.config.activation_memory_budget`` (the
min-cut partitioner's memory budget: ``reference-compiled-budget-<b>``), and the fast encoder at each
recompute level (``xclip-fast-<level>``) and memory budget (``xclip-fast-budget-<b>``, a fraction of
what its ``"none"`` level holds; backend ``"auto"``: triton on CUDA, torch on CPU), and, on CUDA, each
level under activation offloading (``xclip-fast-<level>-offload``: every forward under
``torch.autograd.graph.save_on_cpu(pin_memory=True)``, which moves what the level keeps to host
memory; on a CPU it would move nothing), and, on CUDA, the default level under
``torch.compile(mode="reduce-overhead")`` (``xclip-fast-cudagraphs``: Inductor with the Triton operators
inside, replayed as CUDA graphs; on a CPU there are no graphs to replay). Under bf16 autocast on
CUDA, float32 on CPU.

Columns: time per step; memory: on CUDA the allocator's peak above the weights, gradients and
optimizer state, on CPU the bytes held after the forward (:func:`xclip_fast.bench.memory.held_bytes`;
for compiled providers the bytes their graph saves, :func:`~xclip_fast.bench.memory.saved_bytes`);
matmul FLOPs of forward + backward, attention included (:func:`~xclip_fast.bench.memory.flop_counter`;
compiled providers: the graphs their partitioner makes, run by
:func:`~xclip_fast.bench.memory.counting_backend`); host time: the same step (forward + backward) of
a tiny encoder (width 64, 2 heads, 2 frames of 5 tokens), where the arithmetic is negligible and
the time is what the host spends issuing it, against the original's in the same rounds; on CUDA
the fraction of a step the GPU ran no kernel, and the model FLOP utilisation: the original's
FLOPs per second over the measured dense bf16 matmul rate; for the offloading providers, the bytes
one step moves to host memory (what the level keeps, and the parameters ``save_on_cpu`` copies
too). Every provider's loss and gradients are checked against the original's first step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import time

import torch

from xclip_fast.bench.cases import Case, model_dims
from xclip_fast.bench.measure import MIB, cuda_memory, free, gpu_idle_fraction, host_times, time_interleaved, time_ms
from xclip_fast.bench.memory import CountingOffload, counting_backend, flop_counter, held_bytes, saved_bytes
from xclip_fast.bench.results import Result, compare_to_reference
from xclip_fast.bench.workloads import original_encoder, original_forward
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.recompute import RECOMPUTE_LEVELS
from xclip_fast.testing import TOLERANCES, rel_err

__all__ = ["TRAIN_PROVIDERS", "TRAIN_BUDGETS", "TINY", "GRAPHS", "train_rows", "dense_bf16_tflops", "save_matmuls",
           "SACBlocks", "Trainer", "budget_of", "offloads", "cuda_only"]

TRAIN_BUDGETS = (0.5, 0.3, 0.1)
TRAIN_PROVIDERS = ["reference", "reference-sac", "reference-compiled",
                   *[f"reference-compiled-budget-{b}" for b in TRAIN_BUDGETS],
                   *[f"xclip-fast-{level}" for level in RECOMPUTE_LEVELS],
                   *[f"xclip-fast-budget-{b}" for b in TRAIN_BUDGETS],
                   *[f"xclip-fast-{level}-offload" for level in RECOMPUTE_LEVELS], "xclip-fast-cudagraphs"]
GRAPHS = "xclip-fast-cudagraphs"  # the default level compiled with mode="reduce-overhead"
# the host-time step: the tiny block sizes (d = 64, 2 heads, T = 2, l = 5 tokens) in an encoder
TINY = dict(input_resolution=32, patch_size=16, width=64, layers=2, heads=2, embed_dim=32, num_frames=2, mit_heads=2)


def budget_of(provider: str) -> float | None:
    """The memory budget of a ``...-budget-<b>`` provider, else None."""
    return float(provider.rsplit("-", 1)[1]) if "-budget-" in provider else None


def offloads(provider: str) -> bool:
    """Whether ``provider`` runs under activation offloading (``...-offload``, CUDA only)."""
    return provider.endswith("-offload")


def cuda_only(provider: str) -> str | None:
    """Why ``provider`` measures nothing on a CPU (None where it does)."""
    if offloads(provider):
        return "offloading moves CUDA tensors to the host; a CPU's stay"
    if provider == GRAPHS:
        return "CUDA graphs replay CUDA kernels; on a CPU reduce-overhead is the plain compiled step"
    return None


_SAVE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
         "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
         "aten::_scaled_dot_product_cudnn_attention")


def save_matmuls(ctx, op, *args, **kwargs):
    """Stock selective checkpointing: keep matmul and attention outputs, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = op.name() if hasattr(op, "name") else ""
    return CheckpointPolicy.MUST_SAVE if name in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


class SACBlocks(torch.nn.Module):
    """The original CCT's blocks, each under selective checkpointing (what a user writes in five lines)."""

    def __init__(self, resblocks):
        super().__init__()
        self.resblocks = resblocks

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

        context = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x


def dense_bf16_tflops(device) -> float:
    """The measured dense bf16 matmul rate of ``device`` (8192^3 products), TFLOP/s."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, quick=True)[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


class Trainer:
    """One provider: its own copy of the weights and its own AdamW."""

    def __init__(self, name, enc, device, amp):
        self.name, self.device, self.amp = name, device, amp
        budget = budget_of(name)
        # offloading: every forward under save_on_cpu, counting what it moves
        self.offload = CountingOffload(pin_memory=device.type == "cuda") if offloads(name) else None
        self.counted = None  # compiled providers: the same graphs, run by the FLOP-counting backend
        self.eager = None  # CUDA graphs: FLOPs are counted on the eager module (the same arithmetic)
        if name.startswith("reference"):
            visual, mit = original_encoder(enc)
            if name == "reference-sac":
                visual.transformer.resblocks = SACBlocks(visual.transformer.resblocks)
            self.modules = torch.nn.ModuleList([visual, mit]).to(device).train()
            self.forward = forward = original_forward(visual, mit)
            if name.startswith("reference-compiled"):
                self.flop_box = [0]
                self.forward = _under_budget(torch.compile(forward), budget)
                self.counted = _under_budget(torch.compile(forward, backend=counting_backend(self.flop_box)), budget)
        else:
            fast = copy.deepcopy(enc).to(device).train()
            self.modules = fast
            self.forward = fast
            if name == GRAPHS:
                fast.recompute = "lean"
                self.eager = fast
                self.forward = torch.compile(fast, mode="reduce-overhead")
            else:
                level = name.removeprefix("xclip-fast-").removesuffix("-offload")
                fast.recompute = budget if budget is not None else level
        self.params = list(self.modules.parameters())
        # on CUDA the fused AdamW (one launch per step, what a user trains with), on a CPU the loop
        self.opt = torch.optim.AdamW(self.params, lr=1e-6, **({"fused": True} if device.type == "cuda"
                                                               else {"foreach": False}))

    def loss(self, video, forward=None):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp), \
                self.offload if self.offload is not None else contextlib.nullcontext():
            out = (forward or self.forward)(video)
        return out.float().square().mean()

    def grads(self, video):
        """Loss and flattened gradients of one forward + backward (no step)."""
        for p in self.params:
            p.grad = None
        loss = self.loss(video)
        loss.backward()
        g = torch.cat([p.grad.float().flatten() for p in self.params])
        for p in self.params:
            p.grad = None
        return loss.detach().float(), g

    def step(self, video):
        self.opt.zero_grad(set_to_none=True)
        self.loss(video).backward()
        self.opt.step()

    def held(self, video, forward=None) -> int:
        """Bytes one forward keeps for the backward: :func:`~xclip_fast.bench.memory.held_bytes`, or
        for a compiled provider what its graph saves (:func:`~xclip_fast.bench.memory.saved_bytes`)."""
        measure = held_bytes if self.counted is None else saved_bytes
        return measure(lambda v: self.loss(v, forward), video, keep=[self.modules])[1]

    def fwd_bwd(self, video, forward=None):
        self.loss(video, forward).backward()
        for p in self.params:
            p.grad = None

    def flops(self, video) -> int:
        """Matmul FLOPs (attention included) of one forward + backward: counted around the call for
        eager providers, inside the partitioned graphs for compiled ones."""
        if self.counted is None:
            with flop_counter() as counter:
                self.fwd_bwd(video, self.eager)
            return counter.get_total_flops()
        self.loss(video, self.counted).backward()  # compiles the counting copy
        for p in self.params:
            p.grad = None
        self.flop_box[0] = 0
        self.loss(video, self.counted).backward()
        for p in self.params:
            p.grad = None
        return self.flop_box[0]


def _under_budget(fn, budget: float | None):
    """``fn`` called (so compiled, on its first call) under ``activation_memory_budget=budget``."""
    if budget is None:
        return fn

    @functools.wraps(fn)
    def call(*args):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return fn(*args)
    return call


def host_rows(names, device, amp) -> dict:
    """Host time of every provider's forward + backward on the :data:`TINY` encoder: name ->
    ``(ms, x original)`` (see :func:`xclip_fast.bench.measure.host_times`)."""
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(**TINY)
    video = torch.randn(1, TINY["num_frames"], 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    fns = {}
    for name in ["reference", *[n for n in names if n != "reference"]]:
        tr = Trainer(name, enc, device, amp)
        fns[name] = functools.partial(tr.fwd_bwd, video)
    return host_times(fns, device)


def train_rows(model: str, frames: list[int], batch: int, device: torch.device, quick: bool, env: dict,
               providers=None) -> list[Result]:
    """Rows of the training level for each T of ``frames`` (``batch`` videos)."""
    cuda = device.type == "cuda"
    width, heads, tokens = model_dims(model)
    dtype = "bfloat16-amp" if cuda else "float32"
    peak_rate = dense_bf16_tflops(device) if cuda else None
    names = [p for p in TRAIN_PROVIDERS if providers is None or p in providers]
    t0 = time.perf_counter()
    try:
        host = host_rows([n for n in names if cuda or not cuda_only(n)], device, cuda)
    except Exception as exc:  # the host column is an addition: its failure leaves the rest
        host, host_error = {}, f"{type(exc).__name__}: {exc}"[:200]
    else:
        host_error = None
    print(f"  train host times of the tiny encoder: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    rows = []
    for T in frames:
        case = Case("train", "train", model, batch, T, tokens, width, heads)
        torch.manual_seed(0)
        enc = XCLIPVideoEncoder.from_config(model, num_frames=T)
        r = enc.config["input_resolution"]
        video = torch.randn(batch, T, 3, r, r, generator=torch.Generator().manual_seed(1)).to(device)
        truth = None
        timed, by_name = {}, {}
        t0 = time.perf_counter()
        for name in names:
            row = Result.make(env, case, dtype, "step", name, checked_against="reference")
            rows.append(row)
            by_name[name] = row
            if name in host:
                row.extras["host_ms"], row.extras["host_x"] = host[name]
            elif host_error:
                row.extras["host_error"] = host_error
            if cuda_only(name) and not cuda:
                row.status, row.reason = "skipped", cuda_only(name)
                continue
            try:
                tr = Trainer(name, enc, device, cuda)
                loss, g = tr.grads(video)
                if truth is None:
                    truth = (loss, g)
                within = row.check({"loss/gradients": max(rel_err(loss, truth[0]), rel_err(g, truth[1]))},
                                   TOLERANCES[torch.bfloat16 if cuda else torch.float32])
                del g
                if not within:
                    continue
                row.extras["flops"] = tr.flops(video)
                compiled = tr.counted is not None
                if cuda:
                    row.median_ms, row.p20_ms, row.p80_ms = time_ms(functools.partial(tr.step, video), device, quick)
                    row.peak_mib, row.extra_mib = cuda_memory(functools.partial(tr.step, video), device)
                    row.extras["gpu_idle"] = gpu_idle_fraction(functools.partial(tr.step, video), device)
                    if tr.offload is not None:  # what one step moves to the host
                        tr.offload.moved = tr.offload.parameters = 0
                        tr.step(video)
                        row.extras["offloaded_mib"] = tr.offload.moved / MIB
                        row.extras["offloaded_parameters_mib"] = tr.offload.parameters / MIB
                else:
                    timed[name] = functools.partial(tr.step, video)
                    row.extra_mib = tr.held(video) / MIB
                    row.extras["memory"] = "saved by autograd" if compiled else "held"
            except Exception as exc:  # one provider failing does not stop the others
                row.fail(exc)
            finally:
                free(device)
                # where a time-limited run spends its time (compiles, first launches) shows in its log
                print(f"  train T={T} {name}: {row.status} after {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        if timed:
            # a step takes seconds on a CPU: the quick run times three rounds
            for name, (med, p20, p80) in time_interleaved(timed, quick, rounds=3 if quick else None).items():
                by_name[name].median_ms, by_name[name].p20_ms, by_name[name].p80_ms = med, p20, p80
        compare_to_reference(by_name.values())
        ref = by_name.get("reference")
        for row in by_name.values():
            if row.status != "ok" or row.median_ms is None:
                continue
            flops = row.extras.get("flops")
            if ref is not None and ref.extras.get("flops"):
                row.extras["flops_x"] = flops / ref.extras["flops"] if flops else None
                # model FLOPs: the original's, whatever a provider recomputes
                row.tflops = ref.extras["flops"] / (row.median_ms * 1e-3) / 1e12
                if peak_rate:
                    row.extras["mfu"] = row.tflops / peak_rate
                    row.extras["dense_bf16_tflops"] = peak_rate
        del enc, video
        free(device)
    return rows
