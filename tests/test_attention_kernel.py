"""The Triton attention kernels (forward and backward) against float64 math.

Without a GPU they run in Triton's CPU interpreter on small shapes; with CUDA the same tests run
natively and bf16, TF32 and large shapes are added.
"""

import contextlib

import pytest
import torch
from _helpers import assert_rel, needs_triton
from test_gputime import record_launches

import xclip_fast
from xclip_fast.ops import packed_attention
from xclip_fast.testing import OWN_ERROR_FORWARD, OWN_ERROR_GRADIENT, TF32_TOLERANCE, TOLERANCES, attention_f64, rel_err

pytestmark = needs_triton
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 tl.dot is wrong in the CPU interpreter, "
                                                 "and large shapes are too slow there)")

# (B, SQ, SK, H, D, extra token)
SHAPES = [
    (1, 1, 1, 1, 64, True),  # one frame token + its message token
    (2, 7, 7, 3, 32, True),
    (2, 50, 50, 2, 64, True),  # ViT-B/32 frame
    (1, 197, 197, 1, 64, True),  # ViT-B/16 frame
    (2, 7, 7, 2, 16, False),
    (3, 50, 50, 1, 128, False),
    (5, 1, 1, 2, 64, False),  # message attention, T = 1 (packed)
    (5, 8, 8, 3, 64, False),  # T = 8: packed, last group partly filled
    (2, 37, 37, 2, 32, False),  # T = 37
    (2, 5, 9, 2, 64, True),  # Sq != Sk
    (2, 33, 20, 1, 16, False),
    (1, 3, 70, 2, 128, True),
    (1, 3, 70, 2, 128, False),  # with the token, fp16 dk was wrong on an H200; without it, was it too?
    (2, 7, 7, 2, 40, True),  # head dim that is not a power of two (padded tiles)
]


def _id(s):
    B, SQ, SK, H, D, extra = s
    return f"B{B}-SQ{SQ}-SK{SK}-H{H}-D{D}-{'extra' if extra else 'plain'}"


def _make(shape, dtype, device, requires_grad=True):
    B, SQ, SK, H, D, extra = shape
    ts = [torch.randn(B, SQ, H, D), torch.randn(B, SK, H, D), torch.randn(B, SK, H, D)]
    if extra:
        ts += [torch.randn(B, H, D), torch.randn(B, H, D)]
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in ts]


NAMES = ["output", "grad q", "grad k", "grad v", "grad extra_k", "grad extra_v"]


def _torch_errors(ins, grad, ref, ref_ins):
    """PyTorch's own error on the same inputs in the same precision, by name: the torch backend (SDPA
    over [k; extra k]; its math path in fp32, where TF32 reaches the matmuls), forward and backward,
    against the same float64 truth."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.detach().clone().requires_grad_() for t in ins]
    with sdpa_kernel([SDPBackend.MATH]) if leaves[0].dtype == torch.float32 else contextlib.nullcontext():
        out = xclip_fast.attention(*leaves, backend="torch")
    out.backward(grad)
    return dict(zip(NAMES, [rel_err(out, ref)] + [rel_err(t.grad, r.grad) for t, r in zip(leaves, ref_ins)]))


def _check_against_f64(shape, dtype, device, tol):
    """Output and every gradient against float64 math within ``tol``; on CUDA the bound is also
    PyTorch's own error on the same inputs, x2 in the forward and x3 in the gradients (where it is
    larger than ``tol``: a dtype's rounding that PyTorch's kernels share is not a fault of ours)."""
    ins = _make(shape, dtype, device)
    out = xclip_fast.attention(*ins, backend="triton")
    assert out.dtype == dtype and out.shape == ins[0].shape
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_f64(*ref_ins)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    ours = [out] + [t.grad for t in ins]
    theirs = _torch_errors(ins, grad, ref, ref_ins) if device.type == "cuda" and dtype != torch.float64 else {}
    for name, t, r in zip(NAMES, ours, [ref] + [r.grad for r in ref_ins]):
        bound = max(tol, (OWN_ERROR_FORWARD if name == "output" else OWN_ERROR_GRADIENT) * theirs.get(name, 0.0))
        assert_rel(f"{name} (PyTorch's error {theirs.get(name, float('nan')):.1e})", t, r, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_matches_float64_reference(shape, dtype, device):
    _check_against_f64(shape, dtype, device, TOLERANCES[dtype])


@pytest.mark.parametrize(
    "shape", [(1, 3, 3, 2, 16, True), (2, 4, 3, 1, 16, False), (3, 2, 2, 2, 16, False)],
    ids=["extra", "sq-ne-sk", "packed"],
)
def test_gradcheck_float64(shape, device):
    # fast_mode checks random projections of the Jacobian: the interpreter is too slow for all of it
    ins = _make(shape, torch.float64, device)
    fn = lambda *a: xclip_fast.attention(*a, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-8, fast_mode=True)


def test_gradcheck_float64_non_contiguous(device):
    """q, k, v read in place from a packed seq-first buffer; extra k, v from one (B, 2, H, D) buffer."""
    S, B, H, D = 4, 2, 2, 16
    qkv = torch.randn(S, B, 3, H, D, dtype=torch.float64, device=device).requires_grad_()
    ekv = torch.randn(B, 2, H, D, dtype=torch.float64, device=device).requires_grad_()

    def fn(qkv, ekv):
        q, k, v = qkv.transpose(0, 1).unbind(2)
        assert not q.is_contiguous()
        return xclip_fast.attention(q, k, v, ekv[:, 0], ekv[:, 1], backend="triton")

    assert torch.autograd.gradcheck(fn, (qkv, ekv), eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("extra", [True, False], ids=["extra", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_packed_qkv_entry_point(extra, dtype, device):
    """The modules' entry point: seq-first packed qkv in, seq-first output, one dqkv buffer back."""
    S, B, H, D = 9, 3, 2, 32
    qkv = torch.randn(S, B, 3 * H * D, dtype=dtype, device=device).requires_grad_()
    ekv = torch.randn(B, 2 * H * D, dtype=dtype, device=device).requires_grad_() if extra else None
    out = packed_attention(qkv.view(S, B, 3, H, D).transpose(0, 1),
                           ekv.view(B, 2, H, D) if extra else None, backend="triton")
    assert out.shape == (B, S, H, D)
    assert out.transpose(0, 1).is_contiguous(), "output must keep the seq-first layout of its input"
    q64 = qkv.detach().double().requires_grad_()
    e64 = ekv.detach().double().requires_grad_() if extra else None
    q, k, v = q64.view(S, B, 3, H, D).transpose(0, 1).unbind(2)
    ek, ev = e64.view(B, 2, H, D).unbind(1) if extra else (None, None)
    ref = attention_f64(q, k, v, ek, ev)
    tol = TOLERANCES[dtype]
    assert_rel("output", out, ref, tol)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    assert_rel("grad qkv", qkv.grad, q64.grad, tol)
    if extra:
        assert_rel("grad extra kv", ekv.grad, e64.grad, tol)


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[7]], ids=[_id(SHAPES[3]), _id(SHAPES[7])])
def test_backward_is_bit_identical_across_runs(shape, device):
    ins = _make(shape, torch.float32, device)
    grad = torch.randn(ins[0].shape, device=device)
    runs = []
    for _ in range(2):
        for t in ins:
            t.grad = None
        xclip_fast.attention(*ins, backend="triton").backward(grad)
        runs.append([t.grad.clone() for t in ins])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_rejects_head_dim_over_128(device):
    ins = _make((1, 2, 2, 1, 160, False), torch.float32, device, requires_grad=False)
    with pytest.raises(ValueError, match="head dim D=160 exceeds the triton kernels. maximum 128"):
        xclip_fast.attention(*ins, backend="triton")


# ------------------------------------------------------------------------------------------------
# the sequence backward's grid: persistent programs, key chunks split below the SM count
# ------------------------------------------------------------------------------------------------
def _launch_direct(ins, grad, sms, dtype=torch.float32):
    """out and (dq, dk, dv, dek, dev) from the launchers themselves, planning for ``sms`` SMs, with every
    kernel launch recorded by name."""
    from xclip_fast.kernels import acc_dtype
    from xclip_fast.kernels import attention as A

    q, k, v, *extra = (t.detach() for t in ins)
    ek, ev = extra if extra else (None, None)
    B, SQ, H, _ = q.shape
    out, lse = torch.empty_like(q), torch.empty(B, H, SQ, dtype=acc_dtype(dtype), device=q.device)
    A.attention_fwd(q, k, v, ek, ev, out, lse, q.shape[-1] ** -0.5)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]  # every element must be written
    grads += [torch.full_like(ek, float("nan")), torch.full_like(ev, float("nan"))] if extra else [None, None]
    with record_launches() as log:
        A.attention_bwd(q, k, v, ek, ev, out, lse, grad, *grads, q.shape[-1] ** -0.5, sms=sms)
    return out, [g for g in grads if g is not None], [name for _, name in log]


def _reference_grads(ins, grad):
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    attention_f64(*ref_ins).backward(grad.double())
    return [t.grad for t in ref_ins]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sms, mode", [(64, "split into 3 slices"), (8, "split into 2 slices"),
                                       (6, "one program per sequence x head"), (2, "persistent"),
                                       (1, "persistent")])
def test_sequence_backward_grid_modes(sms, mode, dtype, device):
    """6 sequences x heads of 140 keys (3 key chunks: of 64 at 16 bits, where dq is computed transposed;
    of 32 with 40 idle at fp32, where it is not): each grid the SM count leads to gives float64's
    gradients; dk, dv and the extra token's are bit-identical in every mode (each key chunk's loop is the
    same), dq in every mode that does not split (the same sum in the same order)."""
    from xclip_fast.kernels import attention as A
    from xclip_fast.kernels.plan import launch_plan

    sk = 140 if dtype == torch.float16 else 70
    shape = (2, 9, sk, 3, 16, True)
    torch.manual_seed(0)
    ins = _make(shape, dtype, device, requires_grad=False)
    grad = torch.randn(ins[0].shape, device=device, dtype=dtype)
    split, _, items, programs = A.sequence_bwd_grid(launch_plan(16, dtype, True, False), 2, 3, sk, sms)
    assert mode == (f"split into {split} slices" if split > 1 else "one program per sequence x head"
                    if programs == items else "persistent")
    _, grads, launched = _launch_direct(ins, grad, sms, dtype)
    assert launched == ["_sequence_bwd_kernel"] + (["_sequence_dq_sum_kernel"] if split > 1 else [])
    for name, g, r in zip(NAMES[1:], grads, _reference_grads(ins, grad)):
        assert_rel(name, g, r, TOLERANCES[dtype])
    _, base, _ = _launch_direct(ins, grad, 6, dtype)
    for name, g, b in zip(NAMES[1:], grads, base):
        if name != "grad q" or split == 1:
            assert torch.equal(g, b), f"{name} differs between {mode} and one program per sequence x head"


def test_frame_backward_is_one_launch_at_a_thousand_sequences(device):
    """1,024 frames x heads (the target's lower end), planned for an H100's 132 SMs: one launch, and
    each frame's gradients are float64's."""
    shape = (256, 3, 3, 4, 16, True)
    torch.manual_seed(1)
    ins = _make(shape, torch.float32, device, requires_grad=False)
    grad = torch.randn(ins[0].shape, device=device)
    _, grads, launched = _launch_direct(ins, grad, sms=132)
    assert launched == ["_sequence_bwd_kernel"]
    for name, g, r in zip(NAMES[1:], grads, _reference_grads(ins, grad)):
        assert_rel(name, g, r, TOLERANCES[torch.float32])


@pytest.mark.parametrize("sms", [1, 64], ids=["persistent", "split"])
def test_sequence_backward_keeps_a_nan_inside_its_sequence(sms, device):
    """A NaN in one frame's query reaches only that frame's gradients, also when one program's scratch
    serves every frame in turn (persistent) and when the frame's key chunks are split."""
    shape = (3, 9, 40, 2, 16, True)
    torch.manual_seed(2)
    ins = _make(shape, torch.float32, device, requires_grad=False)
    grad = torch.randn(ins[0].shape, device=device)
    _, clean, _ = _launch_direct(ins, grad, sms)
    ins[0][1, 4, 0, 3] = float("nan")  # frame 1, head 0
    _, dirty, _ = _launch_direct(ins, grad, sms)
    for name, c, d in zip(NAMES[1:], clean, dirty):
        frame_first = name.startswith("grad extra")  # [B, H, D]; the others [B, S, H, D]
        for b in (0, 2):
            assert torch.equal(c[b], d[b]), f"{name}: the NaN of frame 1 reached frame {b}"
        one = d[1, 0] if frame_first else d[1, :, 0]
        other_head = d[1, 1] if frame_first else d[1, :, 1]
        assert torch.isnan(one).any(), f"{name}: frame 1 head 0 lost its NaN"
        assert torch.equal(other_head, c[1, 1] if frame_first else c[1, :, 1]), f"{name}: the NaN crossed heads"


# ------------------------------------------------------------------------------------------------
# native CUDA only
# ------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_bf16_matches_float64_reference(shape, device):
    _check_against_f64(shape, torch.bfloat16, device, TOLERANCES[torch.bfloat16])


@needs_cuda
@pytest.mark.parametrize(
    "shape",
    [(64, 197, 197, 12, 64, True), (32, 257, 257, 16, 64, True), (2, 1024, 1024, 12, 64, False),
     (16, 577, 577, 16, 64, True), (4, 50, 50, 8, 128, True)],
    ids=["B16-frames", "L14-frames", "T1024-messages", "L14-336-frames", "D128"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_large_shapes_cuda(shape, dtype, device):
    _check_against_f64(shape, dtype, device, TOLERANCES[dtype])


@needs_cuda
def test_tf32_when_enabled(device):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _check_against_f64((4, 197, 197, 4, 64, True), torch.float32, device, TF32_TOLERANCE)
    finally:
        torch.set_float32_matmul_precision(previous)
