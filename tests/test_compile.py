"""The kernels as registered operators, and torch.compile(fullgraph=True) through them.

opcheck tests every operator's schema, fake (meta) implementation (shapes and strides), autograd
registration and AOT dispatch with dynamic shapes. Then the block, the encoder (at several frame
counts) and a patched Hugging Face model compile with no graph break and match eager, outputs and
every gradient. Without CUDA the triton backend runs in Triton's interpreter, which only runs on
real tensors, so it compiles with ``backend="aot_eager"`` (the operators stay opaque); the torch
backend compiles with Inductor. On CUDA both backends compile with Inductor.
"""

import copy

import pytest
import torch
import torch._dynamo
from _helpers import BACKENDS, assert_grads_close, assert_rel, needs_triton, one_release, tiny_xclip
from torch._dynamo.testing import CompileCounterWithBackend

import xclip_fast
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.encoder import XCLIPVideoEncoder

CUDA = torch.cuda.is_available()
# float64 on CPU (rounding differences only); on CUDA float32 with exact fp32 products (1e-5, DESIGN.md §5)
DTYPE = torch.float32 if CUDA else torch.float64
TOL = 1e-5 if CUDA else 1e-10  # fp64: DESIGN.md §5; Inductor reorders sums


def _compiler(backend: str) -> str:
    return "inductor" if CUDA or backend == "torch" else "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# operators
# ------------------------------------------------------------------------------------------------
def _opcheck_cases(device, dtype):
    B, S, H, D = 2, 5, 2, 16
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(grad)

    ops = torch.ops.xclip_fast
    q, k, v, ek, ev = t(B, S, H, D), t(B, S + 2, H, D), t(B, S + 2, H, D), t(B, H, D), t(B, H, D)
    # the modules' layout: q, k, v read in place from a seq-first in-projection output
    qkv = torch.randn(S, B, 3, H, D, generator=g, dtype=torch.float64).to(device, dtype).transpose(0, 1)
    qkv.requires_grad_()
    ekv = t(B, 2, H, D)
    nograd = [x.detach() for x in (q, k, v, ek, ev)]
    out, lse = ops.attention_fwd(*nograd, 0.25)
    pout, plse = ops.packed_attention_fwd(qkv.detach(), ekv.detach(), 0.25)
    x = t(3, 7, 5)
    # a seq-first query whose last dimension is not contiguous: the operator copies it (so the output
    # is not seq-first), and its fake must say the same
    q_strided = q.detach().permute(1, 0, 3, 2).contiguous().permute(1, 0, 3, 2).requires_grad_()
    return {
        "attention_fwd-extra": (ops.attention_fwd.default, (q, k, v, ek, ev, 0.25)),
        "attention_fwd-strided": (ops.attention_fwd.default, (q_strided, k, v, ek, ev, 0.25)),
        "attention_fwd-plain": (ops.attention_fwd.default, (q, k, v, None, None, 0.25)),
        "attention_bwd": (ops.attention_bwd.default, (*nograd, out, lse, torch.randn_like(out), 0.25)),
        "packed_attention_fwd-extra": (ops.packed_attention_fwd.default, (qkv, ekv, 0.25)),
        "packed_attention_fwd-plain": (ops.packed_attention_fwd.default, (qkv, None, 0.25)),
        "packed_attention_bwd": (ops.packed_attention_bwd.default,
                                 (qkv.detach(), ekv.detach(), pout, plse, torch.randn_like(pout), 0.25)),
        "quick_gelu": (ops.quick_gelu.default, (x,)),
        "quick_gelu_backward": (ops.quick_gelu_backward.default, (x.detach(), torch.randn_like(x.detach()))),
    }


OPCHECK_IDS = ["attention_fwd-extra", "attention_fwd-strided", "attention_fwd-plain", "attention_bwd",
               "packed_attention_fwd-extra",
               "packed_attention_fwd-plain", "packed_attention_bwd", "quick_gelu", "quick_gelu_backward"]
OPCHECK_DTYPES = [torch.float64, torch.float32] + ([torch.bfloat16] if CUDA else [])


@needs_triton
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", OPCHECK_IDS)
def test_opcheck(case, dtype, device):
    op, args = _opcheck_cases(device, dtype)[case]
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@needs_triton
def test_fake_layouts_equal_real_layouts(device):
    """The fake implementation's strides are the real ones: seq-first in, seq-first out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    S, B, H, D = 6, 3, 2, 16
    qkv = torch.randn(S, B, 3, H, D, device=device, dtype=DTYPE).transpose(0, 1)
    ekv = torch.randn(B, 2, H, D, device=device, dtype=DTYPE)
    real_out, real_lse = torch.ops.xclip_fast.packed_attention_fwd(qkv, ekv, 0.25)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_out, fake_lse = torch.ops.xclip_fast.packed_attention_fwd(mode.from_tensor(qkv), ekv, 0.25)
    assert real_out.transpose(0, 1).is_contiguous()
    assert (fake_out.shape, fake_out.stride()) == (real_out.shape, real_out.stride())
    assert (fake_lse.shape, fake_lse.stride(), fake_lse.dtype) == (real_lse.shape, real_lse.stride(), real_lse.dtype)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------
def _no_graph_break(fn, *args, **kwargs):
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_compiles_fullgraph_and_matches_eager(backend, device):
    block = CrossFrameAttentionBlock(64, 2, T=3, backend=backend).to(device, DTYPE)
    x = torch.randn(7, 6, 64, device=device, dtype=DTYPE)
    _no_graph_break(block, x)
    compiled = torch.compile(block, backend=_compiler(backend), fullgraph=True)
    params = list(block.parameters())
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = block(xe), compiled(xc)
    assert_rel("output", yc, ye, TOL)
    grad = torch.randn_like(ye)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    assert_grads_close(names, _grads(yc, [xc, *params], grad), _grads(ye, [xe, *params], grad), TOL)


@pytest.mark.parametrize("backend", [one_release(BACKENDS[0], "newest"), one_release(BACKENDS[1], "oldest")])
def test_encoder_compiles_once_for_any_frame_count(backend, device):
    """The first new frame count recompiles once with a dynamic T; later counts reuse that graph."""
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32,
                            num_frames=4, mit_heads=2, backend=backend).to(device, DTYPE)
    video = torch.randn(2, 4, 3, 16, 16, device=device, dtype=DTYPE)
    _no_graph_break(enc, video)
    counter = CompileCounterWithBackend(_compiler(backend))
    compiled = torch.compile(enc, backend=counter, fullgraph=True)
    frames_compiled = []
    for T in (4, 6, 9):
        video = torch.randn(2, T, 3, 16, 16, device=device, dtype=DTYPE, requires_grad=True)
        out_e = enc(video)
        out_c = compiled(video)
        assert_rel(f"T={T} output", out_c, out_e, TOL)
        frames_compiled.append(counter.frame_count)
        if T == 6:  # gradients through the dynamic-T graph
            grad = torch.randn_like(out_e)
            params = list(enc.parameters())
            names = ["video"] + [n for n, _ in enc.named_parameters()]
            assert_grads_close(names, _grads(out_c, [video, *params], grad), _grads(out_e, [video, *params], grad),
                               TOL)
    # T=4: the first graph; T=6: one recompilation (T becomes dynamic); T=9: no recompilation
    assert frames_compiled == [1, 2, 2], frames_compiled


@pytest.mark.parametrize("backend", [one_release(BACKENDS[0], "oldest"), one_release(BACKENDS[1], "newest")])
def test_patched_hf_get_video_features_compiles(backend, device):
    model = xclip_fast.patch_xclip(tiny_xclip(DTYPE, attn_implementation="sdpa").to(device), backend=backend)
    video = torch.randn(2, 3, 3, 32, 32, device=device, dtype=DTYPE)
    _no_graph_break(model.get_video_features, pixel_values=video)
    compiled = torch.compile(model.get_video_features, backend=_compiler(backend), fullgraph=True)
    out_e = model.get_video_features(pixel_values=video).pooler_output
    out_c = compiled(pixel_values=video).pooler_output
    assert_rel("pooler_output", out_c, out_e, TOL)
    grad = torch.randn_like(out_e)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith(("text_model", "prompts"))]
    params = [p for _, p in named]
    assert_grads_close([n for n, _ in named], _grads(out_c, params, grad), _grads(out_e, params, grad), TOL)


def test_patched_model_copies_compile_independently(device):
    """A deep copy (EMA, teacher) is its own model, compiled or not."""
    model = xclip_fast.patch_xclip(tiny_xclip(DTYPE).to(device), backend="torch")
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    video = torch.randn(1, 3, 3, 32, 32, device=device, dtype=DTYPE)
    a = model.get_video_features(pixel_values=video).pooler_output
    b = torch.compile(ema.get_video_features, backend="aot_eager", fullgraph=True)(pixel_values=video).pooler_output
    assert (a - b).abs().max() > 1e-3
