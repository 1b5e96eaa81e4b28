"""xclip_fast.attention: input checks and the torch backend against float64 math."""

import pytest
import torch
from _helpers import BACKENDS, assert_rel

import xclip_fast
from xclip_fast.ops import resolve_backend
from xclip_fast.testing import attention_f64


def _inputs(B=2, SQ=5, SK=6, H=3, D=16, dtype=torch.float64, extra=True, device="cpu"):
    q = torch.randn(B, SQ, H, D, dtype=dtype, device=device)
    k = torch.randn(B, SK, H, D, dtype=dtype, device=device)
    v = torch.randn(B, SK, H, D, dtype=dtype, device=device)
    ek = torch.randn(B, H, D, dtype=dtype, device=device) if extra else None
    ev = torch.randn(B, H, D, dtype=dtype, device=device) if extra else None
    return q, k, v, ek, ev


@pytest.mark.parametrize("extra", [True, False], ids=["extra", "plain"])
def test_torch_backend_matches_float64_math(extra, device):
    q, k, v, ek, ev = _inputs(extra=extra, device=device)
    args = [t.requires_grad_() for t in (q, k, v, ek, ev) if t is not None]
    out = xclip_fast.attention(q, k, v, ek, ev, backend="torch", scale=0.3)
    ref_args = [t.detach().clone().requires_grad_() for t in args]
    ref = attention_f64(*ref_args[:3], *(ref_args[3:] if extra else []), scale=0.3)
    assert_rel("output", out, ref, 1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for name, a, r in zip(["q", "k", "v", "extra_k", "extra_v"], args, ref_args):
        assert_rel(f"grad {name}", a.grad, r.grad, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_last_dim_is_copied_not_rejected(backend, device):
    q, k, v, ek, ev = _inputs(device=device)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last stride != 1
    ekt = ek.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1 and ekt.stride(-1) != 1
    out = xclip_fast.attention(qt, k, v, ekt, ev, backend=backend)
    assert_rel("output", out, attention_f64(q, k, v, ek, ev), 1e-12)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, r"q must be 4-D \(B, S, H, D\), got shape \(5, 3, 16\)"),
        (lambda a: {**a, "extra_k": a["extra_k"][None]}, r"extra_k must be 3-D"),
        (lambda a: {**a, "v": a["v"][:, :4]}, r"k and v shapes differ"),
        (lambda a: {**a, "k": a["k"][:, :, :2], "v": a["v"][:, :, :2]}, r"k must be \(B=2, Sk, H=3, D=16\)"),
        (lambda a: {**a, "extra_v": a["extra_v"][:1]}, r"extra_v must be \(B=2, H=3, D=16\), got \(1, 3, 16\)"),
        (lambda a: {**a, "extra_v": None}, "extra_k and extra_v must be given together"),
        (lambda a: {**a, "k": a["k"].float()}, "dtypes differ: q=torch.float64, k=torch.float32"),
        (lambda a: {**a, "q": a["q"].long(), "k": a["k"].long(), "v": a["v"].long(), "extra_k": a["extra_k"].long(),
                    "extra_v": a["extra_v"].long()}, "dtype must be one of"),
        (lambda a: {**a, "k": a["k"].to("meta"), "v": a["v"].to("meta")}, "devices differ"),
        (lambda a: {**a, "q": a["q"][:, :0]}, "every dimension must be >= 1"),
    ],
    ids=["q-rank", "extra-rank", "kv-shape", "k-heads", "extra-batch", "extra-pair", "dtype-mix", "int-dtype",
         "device-mix", "empty"],
)
def test_bad_inputs_raise_value_error(mutate, match):
    q, k, v, ek, ev = _inputs()
    args = mutate(dict(q=q, k=k, v=v, extra_k=ek, extra_v=ev))
    with pytest.raises(ValueError, match=match):
        xclip_fast.attention(args["q"], args["k"], args["v"], args["extra_k"], args["extra_v"], backend="torch")


def test_non_tensor_raises_type_error():
    q, k, v, _, _ = _inputs(extra=False)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        xclip_fast.attention(q, [1, 2], v)


def test_unknown_backend_and_auto():
    q, k, v, ek, ev = _inputs()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'xformers'"):
        xclip_fast.attention(q, k, v, ek, ev, backend="xformers")
    # auto serves CPU tensors with the torch backend, CUDA tensors with triton
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="cannot run this call: triton (runs in interpreter mode|kernels need CUDA)"):
        resolve_backend("triton", torch.device("meta"))
