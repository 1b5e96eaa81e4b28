"""Helpers shared by the tests: relative-error assertions and an independent float64 attention."""

import torch

from xclip_fast.testing import TOLERANCES, rel_err


def assert_rel(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail, naming the tensor, when ``||out - ref|| / ||ref|| > tol`` (NaN or inf always fails)."""
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def tol_for(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def attention_f64(q, k, v, extra_k=None, extra_v=None, scale=None):
    """Plain float64 attention on (B, S, H, D) tensors with an optional extra token (no SDPA)."""
    q, k, v = q.double(), k.double(), v.double()
    if extra_k is not None:
        k = torch.cat([k, extra_k.double()[:, None]], dim=1)
        v = torch.cat([v, extra_v.double()[:, None]], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def copy_block(dst: torch.nn.Module, src: torch.nn.Module) -> torch.nn.Module:
    dst.load_state_dict(src.state_dict())
    return dst


def param_grad_errors(module, ref_module):
    """(name, fast grad, reference grad) for every parameter, by name."""
    ref_params = dict(ref_module.named_parameters())
    return [(name, p.grad, ref_params[name].grad) for name, p in module.named_parameters()]
