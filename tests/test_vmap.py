"""``torch.func.vmap`` over the operators, the Python API and the block: one batched computation, no
per-sample loop.

- Every registered operator, forward and backward, has a batching rule: under ``vmap`` its kernel is
  launched once whatever the vmapped size (PyTorch's fallback would launch it once per sample and
  warn), with vmapped dimensions anywhere and inputs that are not vmapped.
- The Python API and the block, on both backends: ``vmap`` and per-sample gradients
  (``vmap(grad(f))``) equal a Python loop over the samples, with no fallback warning (the torch
  backend writes the attention out on the CPU, where PyTorch's CPU flash kernel has no rule).

Truth: float64 computations without any transform (the float64 reference attention, the original
block, autograd per sample). The kernels compute each sequence alone, so a vmapped call differs from
the loop by rounding only: 1e-12 relative.
"""

import contextlib
import warnings

import pytest
import torch
from _helpers import assert_grads_close, assert_rel, needs_triton
from torch.func import functional_call, grad, vmap

import xclip_fast
from xclip_fast import mlp, ops, reference
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.testing import attention_f64

TOL = 1e-12  # float64, each sequence computed alone in both: rounding only
N, B, S, H, D = 3, 2, 5, 2, 4  # N samples vmapped over
BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=needs_triton)]


@contextlib.contextmanager
def batched(monkeypatch=None):
    """Fails on PyTorch's per-sample fallback warning; with ``monkeypatch``, counts the kernel
    launches of the triton operators (yields the counts)."""
    launches = {}
    if monkeypatch is not None:
        from xclip_fast import library

        def counting(name, launch):
            def counted(*args):
                launches[name] = launches.get(name, 0) + 1
                return launch(*args)

            return counted

        for name in ("_attention_fwd_launch", "_attention_bwd_launch", "_quick_gelu_fwd_launch",
                     "_quick_gelu_bwd_launch"):
            monkeypatch.setattr(library, name, counting(name, getattr(library, name)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield launches
    fallback = [str(w.message) for w in seen if "batching rule" in str(w.message)]
    assert not fallback, fallback


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loop(fn, in_dims, *args):
    """``fn`` sample by sample, stacked: what vmap must equal."""
    outs = []
    for i in range(N):
        outs.append(fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------------
# the raw operators
# ------------------------------------------------------------------------------------------------
def _attention_args(device, extra):
    """q vmapped at dim 0, k at dim 1, v not vmapped (shared by the samples), the extra token at 0."""
    args = [_randn(N, B, S, H, D, seed=1), _randn(B, N, S, H, D, seed=2), _randn(B, S, H, D, seed=3)]
    dims = [0, 1, None]
    if extra:
        args += [_randn(N, B, H, D, seed=4), _randn(N, B, H, D, seed=5)]
        dims += [0, 0]
    else:
        args += [None, None]
        dims += [None, None]
    return [a if a is None else a.to(device) for a in args], dims


def _attention_saved(args, dims):
    """What the backward operator reads, per sample from the forward operator: out, lse, and an
    incoming gradient (seq-first, vmapped at dim 2)."""
    out, lse = _loop(lambda *a: torch.ops.xclip_fast.attention_fwd(*a, 0.4), dims, *args)
    g = _randn(S, B, N, H, D, seed=6).to(out.device).transpose(0, 1)
    return [out, lse, g], [0, 0, 2]


# (operator, with the extra token)
OPERATORS = [(name, extra) for name in ("attention_fwd", "attention_bwd", "packed_attention_fwd",
                                        "packed_attention_bwd") for extra in (True, False)]
OPERATORS += [("quick_gelu", False), ("quick_gelu_backward", False)]


def _operator_call(name, device, extra):
    """(operator, args, in_dims, the launcher it runs)."""
    ops = torch.ops.xclip_fast
    if name.startswith("attention"):
        args, dims = _attention_args(device, extra)
        if name == "attention_fwd":
            return lambda *a: ops.attention_fwd(*a, 0.4), args, dims, "_attention_fwd_launch"
        saved, saved_dims = _attention_saved(args, dims)
        return lambda *a: ops.attention_bwd(*a, 0.4), args + saved, dims + saved_dims, "_attention_bwd_launch"
    if name.startswith("packed"):
        args = [_randn(S, N, B, 3, H, D, seed=7).to(device).permute(1, 2, 0, 3, 4, 5),  # seq-first, vmapped at 0
                _randn(B, 2, H, D, seed=8).to(device) if extra else None]
        dims = [0, None]
        if name == "packed_attention_fwd":
            return lambda *a: ops.packed_attention_fwd(*a, 0.4), args, dims, "_attention_fwd_launch"
        out, lse = _loop(lambda *a: ops.packed_attention_fwd(*a, 0.4), dims, *args)
        g = _randn(N, B, S, H, D, seed=9).to(device)
        return (lambda *a: ops.packed_attention_bwd(*a, 0.4), args + [out, lse, g], dims + [0, 0, 0],
                "_attention_bwd_launch")
    x = _randn(4, N, 6, seed=10).to(device)
    if name == "quick_gelu":
        return ops.quick_gelu, [x], [1], "_quick_gelu_fwd_launch"
    return ops.quick_gelu_backward, [x, _randn(4, 6, seed=11).to(device)], [1, None], "_quick_gelu_bwd_launch"


@needs_triton
@pytest.mark.parametrize("name, extra", OPERATORS, ids=[f"{n}{'-extra' if e else ''}" for n, e in OPERATORS])
def test_operator_runs_once_under_vmap_and_equals_a_loop(name, extra, device, monkeypatch):
    op, args, dims, launcher = _operator_call(name, device, extra)
    want = _loop(op, dims, *args)
    with batched(monkeypatch) as launches:
        got = vmap(op, in_dims=tuple(dims))(*args)
    assert launches == {launcher: 1}, launches  # one launch for the N samples
    for i, (g, w) in enumerate(zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,))))):
        assert_rel(f"{name} output {i}", g, w, TOL)


# ------------------------------------------------------------------------------------------------
# the Python API: vmap and per-sample gradients, both backends
# ------------------------------------------------------------------------------------------------
def _api_case(name, backend, device):
    """(function of the vmapped inputs, the float64 reference of one sample, vmapped inputs)."""
    if name == "attention":
        q, k, v = (_randn(N, B, S, H, D, seed=s).to(device) for s in (1, 2, 3))
        ek, ev = (_randn(N, B, H, D, seed=s).to(device) for s in (4, 5))
        return (lambda *t: xclip_fast.attention(*t, backend=backend), attention_f64, (q, k, v, ek, ev))
    if name == "packed_attention":
        qkv, ekv = _randn(N, B, S, 3, H, D, seed=6).to(device), _randn(N, B, 2, H, D, seed=7).to(device)
        return (lambda t, e: ops.packed_attention(t, e, backend=backend),
                lambda t, e: attention_f64(*t.unbind(2), *e.unbind(1)), (qkv, ekv))
    x = _randn(N, 4, 6, seed=8).to(device)
    return (lambda t: mlp.quick_gelu(t, backend), reference.QuickGELU(), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["attention", "packed_attention", "quick_gelu"])
def test_python_api_vmap_and_per_sample_gradients(name, backend, device, monkeypatch):
    fn, ref, inputs = _api_case(name, backend, device)
    dims = (0,) * len(inputs)
    weights = torch.randn_like(ref(*(t[0] for t in inputs)))
    loss = lambda *t: (fn(*t) * weights).sum()  # noqa: E731
    with batched(monkeypatch if backend == "triton" else None) as launches:
        out = vmap(fn)(*inputs)
        grads = vmap(grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)
    assert_rel(f"vmap {name}", out, _loop(ref, dims, *inputs), TOL)
    for i in range(N):
        sample = [t[i].detach().requires_grad_() for t in inputs]
        want = torch.autograd.grad((ref(*sample) * weights).sum(), sample)
        for j, (g, w) in enumerate(zip(grads, want)):
            assert_rel(f"per-sample gradient {j} of {name}, sample {i}", g[i], w, TOL)
    if backend == "triton":  # the forward once per vmap, then forward and backward once for the N gradients
        fwd, bwd = ("_quick_gelu_fwd_launch", "_quick_gelu_bwd_launch") if name == "quick_gelu" else \
            ("_attention_fwd_launch", "_attention_bwd_launch")
        assert launches == {fwd: 2, bwd: 1}, launches


# ------------------------------------------------------------------------------------------------
# the block: vmap over videos, per-video parameter gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_vmap_and_per_video_gradients(backend, device, monkeypatch):
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(16, 2, T=3).double()
    fast = CrossFrameAttentionBlock(16, 2, T=3, backend=backend).double().to(device)
    fast.load_state_dict(ref.state_dict())
    videos = _randn(N, 4, 2 * 3, 16, seed=12)  # N samples of (l, b*T, d)
    params = {n: p.detach() for n, p in fast.named_parameters()}
    loss = lambda p, x: functional_call(fast, p, (x,)).square().sum()  # noqa: E731
    with batched(monkeypatch if backend == "triton" else None) as launches:
        out = vmap(fast)(videos.to(device))
        per_video = vmap(grad(loss), in_dims=(None, 0))(params, videos.to(device))
    assert_rel("vmap block", out, torch.stack([ref(x) for x in videos]), TOL)
    names = [n for n, _ in ref.named_parameters()]
    for i in range(N):
        ref.zero_grad()
        ref(videos[i]).square().sum().backward()
        # (some gradients are zero in exact arithmetic: assert_grads_close floors them)
        assert_grads_close(names, [per_video[n][i] for n in names], [p.grad for _, p in ref.named_parameters()], TOL)
    if backend == "triton":  # the message and the frame attention: once per pass, whatever N
        assert launches["_attention_fwd_launch"] == 4 and launches["_attention_bwd_launch"] == 2, launches
        assert launches["_quick_gelu_fwd_launch"] == 2 and launches["_quick_gelu_bwd_launch"] == 1, launches
