"""QuickGELU kernels and the fused MLP (c_fc -> QuickGELU -> c_proj) against plain PyTorch."""

import pytest
import torch
from _helpers import BACKENDS, assert_rel, needs_triton

from xclip_fast import reference
from xclip_fast.blocks import official_mlp
from xclip_fast.functional import FusedMLP, run_mlp
from xclip_fast.mlp import QuickGELUMLPFunction


def _gelu64(x):
    x = x.double()
    return x * torch.sigmoid(1.702 * x)


@needs_triton
@pytest.mark.parametrize("n", [1, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
def test_kernels_match_float64(n, dtype, device):
    from xclip_fast.kernels.quick_gelu import quick_gelu_bwd, quick_gelu_fwd

    x = (3 * torch.randn(n, dtype=torch.float64)).to(device, dtype)
    dy = torch.randn(n, dtype=torch.float64).to(device, dtype)
    x64 = x.double().requires_grad_()
    y64 = _gelu64(x64)
    y64.backward(dy.double())
    # one rounding of the result (the kernels compute in fp32 / fp64)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.float64: 1e-14}[dtype]
    assert_rel("forward", quick_gelu_fwd(x, torch.empty_like(x)), y64, tol)
    assert_rel("backward", quick_gelu_bwd(x, dy, torch.empty_like(x)), x64.grad, tol)
    inplace = x.clone()
    quick_gelu_fwd(inplace, inplace)
    assert_rel("in place", inplace, y64, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_function_gradcheck(backend, device):
    x = torch.randn(3, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    w1 = torch.randn(32, 8, dtype=torch.float64, device=device, requires_grad=True)
    b1 = torch.randn(32, dtype=torch.float64, device=device, requires_grad=True)
    w2 = torch.randn(8, 32, dtype=torch.float64, device=device, requires_grad=True)
    b2 = torch.randn(8, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda *a: QuickGELUMLPFunction.apply(*a, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_mlp_module_matches_plain_module(backend, grad, device):
    mlp = reference.clip_mlp(64).to(device, torch.float64)
    x = torch.randn(5, 3, 64, dtype=torch.float64, device=device, requires_grad=grad)
    ref = mlp(x)
    with torch.set_grad_enabled(grad):
        out = run_mlp(official_mlp(mlp), x, backend)
    assert_rel("output", out, ref, 1e-13)
    if grad:
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, [x, *mlp.parameters()], g)
        grads = torch.autograd.grad(out, [x, *mlp.parameters()], g)
        for name, a, b in zip(["x", "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"], grads, ref_grads):
            assert_rel(f"grad {name}", a, b, 1e-13)


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_mlp_saves_less_for_backward():
    """Plain autograd keeps the pre-activation, the sigmoid and the activation (3 x 4d per token);
    the fused MLP keeps the pre-activation only."""
    mlp = reference.clip_mlp(64)
    x = torch.randn(50, 4, 64, requires_grad=True)
    plain = _saved_bytes(lambda: mlp(x))
    fused = _saved_bytes(lambda: run_mlp(official_mlp(mlp), x, "torch"))
    per_token_4d = 4 * 64 * 4 * 50 * 4  # one 4d-wide fp32 tensor
    assert plain - fused >= 2 * per_token_4d


def test_unrecognised_mlp_is_called_as_is():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    x = torch.randn(3, 4)
    assert isinstance(official_mlp(reference.clip_mlp(4)), FusedMLP)
    torch.testing.assert_close(run_mlp(official_mlp(Odd()), x, "torch"), 2 * x)
    mlp = reference.clip_mlp(4)
    mlp.gelu = torch.nn.GELU()  # a swapped activation is honoured, not silently replaced
    assert official_mlp(mlp) is mlp
    torch.testing.assert_close(run_mlp(official_mlp(mlp), x, "torch"), mlp(x))
