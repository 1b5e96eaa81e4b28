"""Activation offloading (``torch.autograd.graph.save_on_cpu``) and any other saved-tensor hooks see
every tensor a recompute level keeps for the backward, at every level: the bytes the hooks see
equal what the level holds (the bench's figure, :func:`xclip_fast.bench.memory.held_bytes`), none
is kept outside them, and a step under the hooks computes what it computes without them. For the
block (plain, and with a wrapped part, which takes the selective fallback), the encoder (levels and
a memory budget) and a patched Hugging Face model; 2 processes with DDP and with frame parallelism
are in test_distributed.py and test_frame_parallel.py."""

import contextlib
import functools

import pytest
import torch
from _helpers import BACKENDS, assert_grads_close, assert_rel, needs_triton, tiny_xclip
from torch import nn

import xclip_fast
from xclip_fast import reference
from xclip_fast.bench.memory import held_bytes, hooked_bytes
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.recompute import RECOMPUTE_LEVELS
from xclip_fast.testing import copied_saved_tensors

LEVELS = list(RECOMPUTE_LEVELS)
# float64 on both sides of every comparison, the same operations in the same order: only a copy
# (offloading) or nothing stands between them, so any difference is a tensor the backward read
# from somewhere else
EXACT = 1e-12
L, B, T, D, H = 7, 2, 3, 32, 2
ENCODER = dict(input_resolution=16, patch_size=8, width=32, layers=2, heads=2, embed_dim=16, num_frames=3, mit_heads=2)


class LowRank(nn.Module):
    """A LoRA-like wrapper: the block cannot read it as a plain Linear (it takes the selective
    fallback at lean/min). ``in_place``: the sum is formed in place, in the base GEMM's output
    (``"base"``, as some LoRA implementations do) or in the update's (``"update"``, a bias-free
    GEMM whose 3-D output is an alias autograd does not track as a view); either way a GEMM output
    the fallback would keep is changed after its GEMM ran."""

    def __init__(self, base: nn.Linear, in_place: str | None = None):
        super().__init__()
        self.base, self.out_features, self.in_place = base, base.out_features, in_place
        self.down = nn.Linear(base.in_features, 2, bias=False, dtype=base.weight.dtype)
        self.up = nn.Linear(2, base.out_features, bias=False, dtype=base.weight.dtype)

    def forward(self, x):
        if self.in_place == "base":
            return self.base(x).add_(self.up(self.down(x)))
        if self.in_place == "update":
            return self.up(self.down(x)).add_(self.base(x))
        return self.base(x) + self.up(self.down(x))


def _block(level, backend, wrapped=False):
    torch.manual_seed(0)
    block = CrossFrameAttentionBlock(D, H, None, 0.2, T, backend=backend, recompute=level).double().train()
    if wrapped:
        block.mlp.c_fc = LowRank(block.mlp.c_fc)
    return block


def _x():
    return torch.randn(L, B * T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _step(fn, params, hooks=None):
    """Output and every gradient of ``fn()`` (drop path seeded alike), its forward under ``hooks``."""
    for p in params:
        p.grad = None
    torch.manual_seed(7)
    with hooks() if hooks is not None else contextlib.nullcontext():
        out = fn()
    out.square().sum().backward()
    return out.detach(), [p.grad for p in params]


def _check(fn, inputs, params, names, model):
    """One training step of ``fn(*inputs)`` without hooks (what it holds: the bench's figure) and
    one under hooks that copy every saved tensor (what they see, what is kept outside them), drop
    path seeded alike: the counts agree, nothing is kept outside, and the output and every gradient
    of ``params`` are the same (the backward read the copies). ``model``'s parameters and buffers
    are not counted (they exist anyway)."""
    results = []
    for hooked in (False, True):
        for p in params:
            p.grad = None
        torch.manual_seed(5)
        if hooked:
            out, seen, outside = hooked_bytes(fn, *inputs, keep=[model], copy=True)
        else:
            out, held = held_bytes(fn, *inputs, keep=[model])
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in params]))
    assert outside == 0, f"{outside} bytes kept for the backward outside the saved-tensor hooks"
    assert abs(seen - held) <= 0.05 * held, f"the hooks saw {seen} bytes, the level holds {held}"
    assert_rel("output under the hooks", results[1][0], results[0][0], EXACT)
    assert_grads_close(names, results[1][1], results[0][1], EXACT)
    return held


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_see_what_a_block_level_keeps(backend, level, wrapped, device):
    block = _block(level, backend, wrapped).to(device)
    x = _x().to(device).requires_grad_()
    _check(block, [x], [x, *block.parameters()], ["x", *dict(block.named_parameters())], block)


def test_the_count_can_fail():
    """What the hooks see orders as the levels do (plain block), and the original, which keeps its
    concatenation through autograd, holds more than "none": the count is not a constant."""
    held = []
    for level in ("none", "lean", "min", "block"):
        block = _block(level, "torch")
        x = _x().requires_grad_()
        held.append(_check(block, [x], [x], ["x"], block))
    assert held == sorted(held, reverse=True) and len(set(held)) == 4, held
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(D, H, None, 0.2, T).double().train()
    x = _x().requires_grad_()
    assert _check(ref, [x], [x], ["x"], ref) > held[0]


@pytest.mark.parametrize("level", LEVELS)
def test_save_on_cpu_through_a_wrapped_block(level):
    """``torch.autograd.graph.save_on_cpu()`` itself (on CPU tensors it keeps them as they are):
    the block with a wrapped part at every level computes what it computes without it."""
    block = _block(level, "torch", wrapped=True)
    x = _x().requires_grad_()
    plain = _step(lambda: block(x), [x, *block.parameters()])
    out, grads = _step(lambda: block(x), [x, *block.parameters()], torch.autograd.graph.save_on_cpu)
    assert_rel("output", out, plain[0], EXACT)
    assert_grads_close(["x", *dict(block.named_parameters())], grads, plain[1], EXACT)


# the triton backend at the default level and a budget (which mixes the levels): the block covers
# every level on both backends, and the interpreter is slow
ENCODER_CASES = [("torch", r) for r in (*LEVELS, 0.4)] + [pytest.param("triton", r, marks=needs_triton)
                                                          for r in ("lean", 0.4)]


@pytest.mark.parametrize("backend, recompute", ENCODER_CASES)
def test_hooks_see_what_the_encoder_keeps(backend, recompute):
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(**ENCODER, backend=backend, recompute=recompute, droppath=0.1).double().train()
    video = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _check(enc, [video], list(enc.parameters()), list(dict(enc.named_parameters())), enc)


@pytest.mark.parametrize("level", LEVELS)
def test_hooks_see_what_a_patched_hf_model_keeps(level):
    model = tiny_xclip(torch.float64, attn_implementation="sdpa").train()
    xclip_fast.patch_xclip(model, backend="torch", recompute=level)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    _check(lambda v, i: model(input_ids=i, pixel_values=v, return_loss=True).logits_per_video, [video, ids],
           [p for _, p in named], [n for n, _ in named], model)


@pytest.mark.parametrize("in_place", ["base", "update"])
@pytest.mark.parametrize("level", ["lean", "min"])
def test_selective_fallback_with_a_kept_output_changed_in_place(level, in_place):
    """A wrapped MLP that forms its sum in place in a GEMM's output: the fallback does not keep that
    output (it was written after its GEMM ran) and runs the GEMM again in backward; the result
    equals the original's, with and without offloading."""
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(D, H, None, 0.0, T).double().train()
    fast = CrossFrameAttentionBlock(D, H, None, 0.0, T, backend="torch", recompute=level).double().train()
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):
        m.mlp.c_fc = LowRank(m.mlp.c_fc, in_place=in_place)
    fast.mlp.c_fc.load_state_dict(ref.mlp.c_fc.state_dict())
    results = []
    for m, hooks in ((ref, None), (fast, None), (fast, copied_saved_tensors)):
        x = _x().requires_grad_()
        results.append(_step(functools.partial(m, x), [x, *m.parameters()], hooks))
    names = ["x", *dict(fast.named_parameters())]
    for out, grads in results[1:]:
        assert_rel("output", out, results[0][0], 1e-10)
        assert_grads_close(names, grads, results[0][1], 1e-10)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_offloading_a_compiled_block(wrapped):
    """Under torch.compile (AOTAutograd; the fallback for a wrapped part is PyTorch's selective
    checkpointing there, applied when the graph is partitioned) the compiled graph saves what it
    keeps through the hooks as well: a step whose saved tensors are all copies equals the eager
    step without hooks, and the hooks see activations, not only parameters and the input. (What
    is kept outside the hooks is measured in eager mode only: the storage tracker is a dispatch
    mode, under which the compiled graph does not run.)"""
    block = _block("lean", "torch", wrapped)
    x = _x().requires_grad_()
    params, names = [x, *block.parameters()], ["x", *dict(block.named_parameters())]
    eager = _step(lambda: block(x), params)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach().clone()

    out, grads = _step(lambda: compiled(x), params, lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    given = {p.untyped_storage().data_ptr() for p in params}
    assert sum(n for k, n in seen.items() if k not in given) > x.nbytes, seen
    # the same float64 operations, fused or reordered by the graph: rounding only
    assert_rel("output", out, eager[0], 1e-10)
    assert_grads_close(names, grads, eager[1], 1e-10)
