"""``torch.func`` transforms and forward-mode AD: right, or refused with a message.

- The Python API and the modules run ``grad``, ``jacrev``, ``vmap``, ``jvp``, ``jacfwd`` and
  ``torch.autograd.forward_ad`` on the torch backend (``"auto"`` picks it on the CPU; the torch backend
  writes the attention out under forward-mode AD, where PyTorch's fused SDPA kernels have no formula).
  Checked against float64 references computed without any transform (autograd Jacobians).
- ``backend="triton"`` runs ``grad``, ``jacrev`` and ``vmap`` on the kernels and refuses forward-mode AD
  and nested reverse mode with a ``ValueError`` naming the reason (vmap and per-sample gradients on
  both backends in detail: tests/test_vmap.py).
- The registered operators refuse forward-mode AD (PyTorch would run them without a formula and
  return zero tangents); under reverse-mode ``torch.func`` transforms of the raw operator PyTorch
  itself raises (the Python API differentiates them through Functions ``torch.func`` accepts).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _helpers import assert_grads_close, assert_rel, needs_triton
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import xclip_fast
from xclip_fast import mlp, ops, reference
from xclip_fast.blocks import CrossFrameAttentionBlock, ResidualAttentionBlock
from xclip_fast.testing import attention_f64

F64_TOL = 1e-10  # float64 throughout: rounding only
B, S, H, Dh = 2, 4, 2, 4


def _attention_inputs(extra=True):
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(B, S, H, Dh, generator=g, dtype=torch.float64) for _ in range(3)]
    if extra:
        ts += [torch.randn(B, H, Dh, generator=g, dtype=torch.float64) for _ in range(2)]
    return ts


def _jacobian(fn, *args):
    """The Jacobian by plain reverse-mode autograd, one output at a time (no torch.func)."""
    return torch.autograd.functional.jacobian(fn, args)


def _jvp_by_jacobian(fn, args, tangents):
    out = fn(*args)
    jac = _jacobian(fn, *args)
    return sum((j.reshape(out.numel(), -1) @ t.reshape(-1)).view(out.shape) for j, t in zip(jac, tangents))


@pytest.mark.parametrize("extra", [False, True], ids=["plain", "extra-token"])
def test_attention_jvp_jacfwd_and_dual_numbers(extra):
    args = _attention_inputs(extra)
    tangents = [torch.randn_like(a) for a in args]
    fn = lambda *a: xclip_fast.attention(*a, backend="auto")  # noqa: E731
    want = _jvp_by_jacobian(attention_f64, args, tangents)
    out, tangent = jvp(fn, tuple(args), tuple(tangents))
    assert tangent.abs().max() > 0.1
    assert_rel("jvp", tangent, want, F64_TOL)
    assert_rel("jvp primal", out, attention_f64(*args), F64_TOL)
    with fwAD.dual_level():
        dual = fn(*[fwAD.make_dual(a, t) for a, t in zip(args, tangents)])
        assert_rel("forward_ad tangent", fwAD.unpack_dual(dual).tangent, want, F64_TOL)
    jac = jacfwd(fn, argnums=0)(*args)
    assert_rel("jacfwd", jac, _jacobian(attention_f64, *args)[0], F64_TOL)


def test_attention_grad_jacrev_vmap():
    q, k, v, ek, ev = _attention_inputs()
    fn = lambda q: xclip_fast.attention(q, k, v, ek, ev)  # noqa: E731
    ref = lambda q: attention_f64(q, k, v, ek, ev)  # noqa: E731
    weights = torch.randn(B, S, H, Dh, dtype=torch.float64)
    assert_rel("grad", grad(lambda q: (fn(q) * weights).sum())(q), _jacobian(lambda q: (ref(q) * weights).sum(), q)[0],
               F64_TOL)
    assert_rel("jacrev", jacrev(fn)(q), _jacobian(ref, q)[0], F64_TOL)
    qs = torch.randn(3, B, S, H, Dh, dtype=torch.float64)
    assert_rel("vmap", vmap(fn)(qs), torch.stack([ref(x) for x in qs]), F64_TOL)
    qkv = torch.randn(B, S, 3, H, Dh, dtype=torch.float64)
    assert_rel("packed jvp", jvp(ops.packed_attention, (qkv,), (qkv,))[1],
               _jvp_by_jacobian(lambda t: attention_f64(*t.unbind(2)), (qkv,), (qkv,)), F64_TOL)


def test_quick_gelu_mlp_under_transforms():
    x, w1, b1, w2, b2 = (torch.randn(*s, dtype=torch.float64) for s in ((3, 4), (8, 4), (8,), (4, 8), (4,)))
    ref = lambda x: reference.QuickGELU()(x @ w1.t() + b1) @ w2.t() + b2  # noqa: E731
    fn = lambda x: mlp.quick_gelu_mlp(x, w1, b1, w2, b2)  # noqa: E731
    assert_rel("jvp", jvp(fn, (x,), (x,))[1], _jvp_by_jacobian(ref, (x,), (x,)), F64_TOL)
    assert_rel("jacrev", jacrev(fn)(x), _jacobian(ref, x)[0], F64_TOL)
    assert_rel("vmap", vmap(fn)(x), ref(x), F64_TOL)
    want = _jvp_by_jacobian(reference.QuickGELU(), (x,), (x,))
    assert_rel("quick_gelu jvp", jvp(mlp.quick_gelu, (x,), (x,))[1], want, F64_TOL)


def _blocks(backend):
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(16, 2, T=3).double()
    fast = CrossFrameAttentionBlock(16, 2, T=3, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fast_block_under_every_transform(backend):
    ref, fast = _blocks(backend)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    v = torch.randn_like(x)
    assert_rel("jvp", jvp(fast, (x,), (v,))[1], _jvp_by_jacobian(ref, (x,), (v,)), F64_TOL)
    with fwAD.dual_level():
        assert_rel("forward_ad", fwAD.unpack_dual(fast(fwAD.make_dual(x, v))).tangent,
                   _jvp_by_jacobian(ref, (x,), (v,)), F64_TOL)
    assert_rel("jacrev", jacrev(fast)(x), _jacobian(ref, x)[0], F64_TOL)
    assert_rel("jacfwd", jacfwd(fast)(x), _jacobian(ref, x)[0], F64_TOL)
    xs = torch.randn(2, 3, 6, 16, dtype=torch.float64)
    assert_rel("vmap", vmap(fast)(xs), torch.stack([ref(t) for t in xs]), F64_TOL)
    # per-parameter gradients through functional_call (meta-learning, per-sample gradients)
    params = {n: p.detach() for n, p in fast.named_parameters()}
    grads = grad(lambda p: functional_call(fast, p, (x,)).square().sum())(params)
    ref.zero_grad()
    ref(x).square().sum().backward()
    names = [n for n, _ in ref.named_parameters()]
    # (some of these are zero in exact arithmetic, e.g. key biases: assert_grads_close floors them)
    assert_grads_close(names, [grads[n] for n in names], [p.grad for _, p in ref.named_parameters()], F64_TOL)
    # per-video gradients: vmap over the 2 videos of x (l, b*T, d) = (3, 2*3, 16)
    videos = x.view(3, 2, 3, 16)
    per_video = vmap(grad(lambda p, t: functional_call(fast, p, (t,)).square().sum()), in_dims=(None, 1))(params,
                                                                                                          videos)
    for i in range(2):
        ref.zero_grad()
        ref(videos[:, i]).square().sum().backward()
        assert_grads_close(names, [per_video[n][i] for n in names], [p.grad for _, p in ref.named_parameters()],
                           F64_TOL)


def test_mit_block_jvp():
    torch.manual_seed(0)
    ref = reference.ResidualAttentionBlock(16, 2).double()
    fast = ResidualAttentionBlock(16, 2).double()
    fast.load_state_dict(ref.state_dict())
    x, v = torch.randn(4, 2, 16, dtype=torch.float64), torch.randn(4, 2, 16, dtype=torch.float64)
    assert_rel("MIT jvp", jvp(fast, (x,), (v,))[1], _jvp_by_jacobian(ref, (x,), (v,)), F64_TOL)


# ------------------------------------------------------------------------------------------------
# the triton backend and the raw operators refuse
# ------------------------------------------------------------------------------------------------
REFUSED = {
    "jvp": (lambda f, x: jvp(f, (x,), (x,)), "forward-mode AD .* not supported by the triton kernels"),
    "jacfwd": (lambda f, x: jacfwd(f)(x), "forward-mode AD"),
    "jacrev of jacrev": (lambda f, x: jacrev(jacrev(f))(x), "nested torch.func.grad/vjp/jacrev"),
}


@needs_triton
@pytest.mark.parametrize("transform", list(REFUSED))
def test_triton_backend_refuses_what_its_kernels_cannot_differentiate(transform, device):
    q = torch.randn(B, S, H, Dh, dtype=torch.float64, device=device)
    run, message = REFUSED[transform]
    with pytest.raises(ValueError, match=message):
        run(lambda t: xclip_fast.attention(t, q, q, backend="triton"), q)
    _, fast = _blocks("triton")
    x = torch.randn(3, 6, 16, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=message):
        run(fast.to(device), x)


@needs_triton
def test_triton_backend_runs_grad_and_jacrev(device):
    """Reverse mode on the kernels (one level): gradients and Jacobians equal the float64 reference's
    (the block's per-sample gradients: tests/test_vmap.py)."""
    q, k, v, ek, ev = (t.to(device) for t in _attention_inputs())
    fn = lambda q: xclip_fast.attention(q, k, v, ek, ev, backend="triton")  # noqa: E731
    ref = lambda q: attention_f64(q, k, v, ek, ev)  # noqa: E731
    weights = torch.randn(B, S, H, Dh, dtype=torch.float64, device=device)
    assert_rel("grad", grad(lambda q: (fn(q) * weights).sum())(q), _jacobian(lambda q: (ref(q) * weights).sum(), q)[0],
               F64_TOL)
    # (a Jacobian of a few outputs: the interpreter runs each of the vmapped backward's programs in Python)
    assert_rel("jacrev", jacrev(lambda q: fn(q).sum((1, 2)))(q), _jacobian(lambda q: ref(q).sum((1, 2)), q)[0],
               F64_TOL)


@needs_triton
@pytest.mark.parametrize("op", ["attention_fwd", "packed_attention_fwd", "quick_gelu"])
def test_raw_operators_refuse_forward_ad(op, device):
    q = torch.randn(B, S, H, Dh, dtype=torch.float64, device=device)
    calls = {"attention_fwd": lambda t: torch.ops.xclip_fast.attention_fwd(t, q, q, None, None, 0.5)[0],
             "packed_attention_fwd": lambda t: torch.ops.xclip_fast.packed_attention_fwd(
                 torch.stack([t, q, q], 2), None, 0.5)[0],
             "quick_gelu": torch.ops.xclip_fast.quick_gelu}
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported by the Triton kernels"):
        jvp(calls[op], (q,), (q,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        calls[op](fwAD.make_dual(q, q))
    with pytest.raises(RuntimeError, match="setup_context"):  # PyTorch's own refusal, never a silent zero
        grad(lambda t: calls[op](t).sum())(q)
    # vmap runs them (their batching rules: tests/test_vmap.py)
    out = vmap(calls[op])(q[None].expand(2, -1, -1, -1, -1))
    assert_rel("vmap of the raw operator", out[1], calls[op](q), F64_TOL)
