"""CrossFrameAttentionBlock and ResidualAttentionBlock against the reference modules."""

import pytest
import torch
from _helpers import BACKENDS, assert_rel, needs_triton, param_grad_errors

import xclip_fast
from xclip_fast import reference
from xclip_fast.blocks import CrossFrameAttentionBlock, ResidualAttentionBlock

# Module-level tolerances (relative error against the reference run in the same dtype):
# float64 - both sides are float64 with different operation order: rounding only (~1e-16 per op).
# float32 - the reference itself rounds at ~1e-7 per op; LayerNorm-weight gradients sum over all
#           tokens and frames, so allow two orders of magnitude of accumulated rounding.
BLOCK_TOL = {torch.float64: 1e-12, torch.float32: 2e-5}

# (l, b, T, d, heads): odd token counts, a single frame, single video, 2-4 heads
SHAPES = [
    (1, 2, 3, 64, 2),
    (7, 1, 1, 64, 4),
    (7, 2, 3, 96, 3),
    (50, 2, 3, 64, 2),
    (50, 1, 8, 96, 4),
]
SHAPE_IDS = [f"l{l}-b{b}-T{T}-d{d}-H{h}" for l, b, T, d, h in SHAPES]
# the interpreter is slow: the triton backend runs the smaller shapes here (the full list on CUDA)
TRITON_SHAPES = SHAPES if torch.cuda.is_available() else SHAPES[:3]


def _run_pair(ref, fast, x, T=None):
    xr = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    yr = ref(xr)
    yf = fast(xf) if T is None else fast(xf, T=T)
    grad = torch.randn_like(yr)
    yr.backward(grad)
    yf.backward(grad)
    return (yf, yr), (xf.grad, xr.grad)


def _check_block(backend, shape, dtype, device):
    l, b, T, d, h = shape
    ref = reference.CrossFramelAttentionBlock(d, h, T=T).to(device, dtype)
    fast = CrossFrameAttentionBlock(d, h, T=T, backend=backend).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, device=device, dtype=dtype)
    (yf, yr), (gf, gr) = _run_pair(ref, fast, x)
    tol = BLOCK_TOL[dtype]
    assert_rel("output", yf, yr, tol)
    assert_rel("grad x", gf, gr, tol)
    for name, g, g_ref in param_grad_errors(fast, ref):
        assert_rel(f"grad {name}", g, g_ref, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_block_torch_matches_reference(shape, dtype, device):
    _check_block("torch", shape, dtype, device)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=SHAPE_IDS[: len(TRITON_SHAPES)])
def test_block_triton_matches_reference(shape, dtype, device):
    _check_block("triton", shape, dtype, device)


def test_official_spelling_and_positional_constructor():
    """Code written against the official module: the official name, positional arguments
    (d_model, n_head, attn_mask, droppath, T), the same structure and the same computation."""
    ref = reference.CrossFramelAttentionBlock(64, 4, None, 0.25, 3).double()
    fast = xclip_fast.CrossFramelAttentionBlock(64, 4, None, 0.25, 3).double()
    assert fast.T == 3 and fast.drop_path.drop_prob == 0.25 and fast.attn_mask is None
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, 64, dtype=torch.float64)
    ref.eval(), fast.eval()
    assert_rel("output", fast(x), ref(x), 1e-12)


def test_state_dict_keys_shapes_and_repr_identical():
    ref = reference.CrossFramelAttentionBlock(64, 4, droppath=0.1, T=8)
    fast = CrossFrameAttentionBlock(64, 4, droppath=0.1, T=8)
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    assert {k: v.shape for k, v in ref_sd.items()} == {k: v.shape for k, v in fast_sd.items()}
    assert repr(ref).replace("CrossFramelAttentionBlock", "X") == repr(fast).replace("CrossFrameAttentionBlock", "X")


def test_checkpoints_load_both_ways():
    ref = reference.CrossFramelAttentionBlock(64, 4, T=2)
    fast = CrossFrameAttentionBlock(64, 4, T=2)
    fast.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p))
    ref.load_state_dict(fast.state_dict(), strict=True)
    for k, v in fast.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_mode_drop_path_matches_reference(backend, device):
    """Drop path draws one keep/drop per token row (official quirk); same seed -> same masks."""
    l, b, T, d, h = 7, 2, 3, 64, 2
    ref = reference.CrossFramelAttentionBlock(d, h, droppath=0.5, T=T).to(device, torch.float64).train()
    fast = CrossFrameAttentionBlock(d, h, droppath=0.5, T=T, backend=backend).to(device, torch.float64).train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, device=device, dtype=torch.float64)
    torch.manual_seed(1234)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    torch.manual_seed(1234)
    xf = x.clone().requires_grad_()
    yf = fast(xf)
    assert_rel("train output", yf, yr, 1e-12)
    grad = torch.randn_like(yr)
    yr.backward(grad)
    yf.backward(grad)
    assert_rel("train grad x", xf.grad, xr.grad, 1e-12)
    # with rate 0.5 and 7 + 8 + 3 rows drawn, some rows are dropped: train differs from eval
    ref.eval()
    assert (ref(x) - yr).abs().max() > 1e-3


def test_backend_selectable_after_construction(device):
    l, b, T, d, h = 7, 1, 2, 64, 2
    ref = reference.CrossFramelAttentionBlock(d, h, T=T).to(device, torch.float64)
    fast = CrossFrameAttentionBlock(d, h, T=T, backend="reference").to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, device=device, dtype=torch.float64)
    assert torch.equal(fast(x), ref(x))
    fast.backend = "torch"
    assert fast.backend == "torch"
    assert_rel("torch backend output", fast(x), ref(x), 1e-12)
    with pytest.raises(ValueError, match="backend must be one of"):
        fast.backend = "cuda"


def test_T_override_per_call(device):
    ref = reference.CrossFramelAttentionBlock(64, 2, T=4).to(device, torch.float64)
    fast = CrossFrameAttentionBlock(64, 2, T=0, backend="torch").to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 8, 64, device=device, dtype=torch.float64)
    assert_rel("output with T=4 per call", fast(x, T=4), ref(x), 1e-12)


@pytest.mark.parametrize("mask_kind", ["2d", "3d"])
def test_attn_mask_torch_backend_matches_reference(mask_kind, device):
    l, b, T, d, h = 6, 2, 2, 64, 2
    N = b * T
    if mask_kind == "2d":
        mask = torch.randn(l + 1, l + 1, device=device, dtype=torch.float64)
        mask[0, 3] = float("-inf")
    else:
        mask = torch.randn(N * h, l + 1, l + 1, device=device, dtype=torch.float64)
    ref = reference.CrossFramelAttentionBlock(d, h, attn_mask=mask, T=T).to(device, torch.float64)
    fast = CrossFrameAttentionBlock(d, h, attn_mask=mask, T=T, backend="torch").to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, N, d, device=device, dtype=torch.float64)
    (yf, yr), (gf, gr) = _run_pair(ref, fast, x)
    assert_rel("masked output", yf, yr, 1e-12)
    assert_rel("masked grad x", gf, gr, 1e-12)
    # auto cannot use the kernels with a mask and picks torch: same answer
    fast.backend = "auto"
    assert_rel("masked output (auto)", fast(x), yr, 1e-12)


def test_attn_mask_rejected_by_triton_backend(device):
    mask = torch.zeros(8, 8, device=device)
    block = CrossFrameAttentionBlock(64, 2, attn_mask=mask, T=1, backend="triton").to(device)
    with pytest.raises(ValueError, match="cannot run this call: an attention mask is not supported"):
        block(torch.randn(7, 2, 64, device=device))


def test_attn_mask_wrong_shape():
    block = CrossFrameAttentionBlock(64, 2, attn_mask=torch.zeros(5, 5), T=1, backend="torch")
    with pytest.raises(ValueError, match="attn_mask must be"):
        block(torch.randn(7, 2, 64))


@pytest.mark.parametrize(
    "x_shape, T, match",
    [
        ((7, 4), 2, "must be 3-D"),
        ((7, 4, 64, 1), 2, "must be 3-D"),
        ((7, 4, 32), 2, "last dim of x must be d_model=64, got 32"),
        ((7, 6, 64), 4, r"b\*T=6\) must be divisible by T=4"),
        ((7, 4, 64), 0, "T must be an int >= 1"),
        ((7, 4, 64), -2, "T must be an int >= 1"),
    ],
)
def test_bad_input_raises(x_shape, T, match):
    block = CrossFrameAttentionBlock(64, 2, backend="torch")  # T=0: given per call
    with pytest.raises(ValueError, match=match):
        block(torch.randn(*x_shape), T=T)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="d_model must be divisible by n_head, got d_model=64, n_head=5"):
        CrossFrameAttentionBlock(64, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        CrossFrameAttentionBlock(64, 2, backend="fast")
    with pytest.raises(ValueError, match="d_model must be divisible"):
        ResidualAttentionBlock(30, 4)


def test_triton_backend_on_unsupported_device_raises():
    # a device the triton backend never serves (meta) exercises the refusal on every machine
    block = CrossFrameAttentionBlock(64, 2, T=1, backend="triton")
    with pytest.raises(ValueError, match="cannot run this call: triton (runs in interpreter mode|kernels need CUDA)"):
        block(torch.randn(3, 2, 64, device="meta"))


# ------------------------------------------------------------------------------------------------
# ResidualAttentionBlock (the MIT's block)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("S, B, d, h", [(1, 2, 64, 2), (8, 3, 64, 4), (37, 1, 96, 3)], ids=["S1", "S8", "S37"])
def test_residual_block_matches_reference(backend, dtype, S, B, d, h, device):
    ref = reference.ResidualAttentionBlock(d, h).to(device, dtype)
    fast = ResidualAttentionBlock(d, h, backend=backend).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(S, B, d, device=device, dtype=dtype)
    (yf, yr), (gf, gr) = _run_pair(ref, fast, x)
    tol = BLOCK_TOL[dtype]
    assert_rel("output", yf, yr, tol)
    assert_rel("grad x", gf, gr, tol)
    for name, g, g_ref in param_grad_errors(fast, ref):
        assert_rel(f"grad {name}", g, g_ref, tol)


def test_residual_block_mask_and_bad_input(device):
    S, B, d, h = 5, 2, 64, 2
    mask = torch.triu(torch.full((S, S), float("-inf"), device=device, dtype=torch.float64), 1)
    ref = reference.ResidualAttentionBlock(d, h, attn_mask=mask).to(device, torch.float64)
    fast = ResidualAttentionBlock(d, h, attn_mask=mask, backend="torch").to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(S, B, d, device=device, dtype=torch.float64)
    assert_rel("causal output", fast(x), ref(x), 1e-12)
    with pytest.raises(ValueError, match=r"must be \(S, B, d=64\)"):
        fast(torch.randn(S, B, 32, device=device, dtype=torch.float64))


def _saved(fn):
    """Shapes of the tensors autograd saves during ``fn``, and the bytes of their distinct storages
    (parameters excluded: they exist anyway)."""
    shapes, storages = [], {}

    def pack(t):
        shapes.append(tuple(t.shape))
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes, sum(storages.values())


@needs_triton
def test_triton_block_saves_no_concatenation_and_no_attention_matrix(device):
    """Training memory: backward needs the inputs and the log-sum-exp, not [x; msg] or P."""
    l, b, T, d, h = 7, 2, 3, 64, 2  # l + 1 = 8 is no other dimension here
    ref = reference.CrossFramelAttentionBlock(d, h, T=T).to(device)
    fast = CrossFrameAttentionBlock(d, h, T=T, backend="triton").to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, device=device, requires_grad=True)
    shapes, fast_bytes = _saved(lambda: fast(x))
    assert not [s for s in shapes if l + 1 in s], f"a tensor with l+1 tokens was saved: {shapes}"
    # an attention matrix would be (..., l, l+1), caught above, or (..., l, l)
    assert not [s for s in shapes if s[-2:] == (l, l)], f"an attention matrix was saved: {shapes}"
    ref_shapes, ref_bytes = _saved(lambda: ref(x))
    assert [s for s in ref_shapes if l + 1 in s]  # the original keeps its concatenated activation
    assert fast_bytes < 0.8 * ref_bytes, (fast_bytes, ref_bytes)
