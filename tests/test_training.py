"""Mixed precision: every fast module trains under torch.autocast (bf16 and fp16) like the original.

The reference for each check is the original model under the same autocast, so the question asked
is always "does the fast path lose more precision than the original does?". bf16 runs on the torch
backend only here: Triton's CPU interpreter computes bf16 matrix products wrongly (the triton
backend refuses bf16 in interpreter mode); on CUDA the same tests run both backends in both dtypes.
"""

import copy

import pytest
import torch
from _helpers import needs_triton, rel_err, tiny_xclip

import xclip_fast
from xclip_fast import reference
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.encoder import XCLIPVideoEncoder

CUDA = torch.cuda.is_available()

# (backend, autocast dtype): the interpreter runs the triton backend in fp16 only (see the doc above)
CASES = [("torch", torch.bfloat16), ("torch", torch.float16), pytest.param("triton", torch.float16, marks=needs_triton)]
if CUDA:
    CASES.append(pytest.param("triton", torch.bfloat16, marks=needs_triton))
IDS = ["torch-bf16", "torch-fp16", "triton-fp16"] + (["triton-bf16"] if CUDA else [])
# how much more error than the original under the same autocast the fast path may have: its
# operation order differs (separate message token, fused MLP), so rounding differs by small factors
AMP_FACTOR = 3.0


def _device_type(device):
    return torch.device(device).type


def _tiny_encoder(backend):
    torch.manual_seed(0)
    return XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32,
                             num_frames=3, mit_heads=2, backend=backend).train()


@pytest.mark.parametrize("backend, amp", CASES, ids=IDS)
def test_block_under_autocast_matches_the_original(backend, amp, device):
    """Output dtype, gradient dtypes and errors against float64 like the original block's."""
    l, b, T, d, h = 7, 2, 3, 64, 2
    ref = reference.CrossFramelAttentionBlock(d, h, T=T).to(device)
    fast = CrossFrameAttentionBlock(d, h, T=T, backend=backend).to(device)
    fast.load_state_dict(ref.state_dict())
    truth = copy.deepcopy(ref).double()
    x = torch.randn(l, b * T, d, device=device)
    grad = torch.randn(l, b * T, d, device=device)
    results = {}
    for name, module in (("reference", ref), ("fast", fast), ("float64", truth)):
        xi = x.clone().to(torch.float64 if name == "float64" else x.dtype).requires_grad_()
        with torch.autocast(_device_type(device), dtype=amp, enabled=name != "float64"):
            y = module(xi)
        y.backward(grad.to(y.dtype))
        results[name] = (y, xi.grad, {n: p.grad for n, p in module.named_parameters()})
    (y_ref, gx_ref, gp_ref), (y_fast, gx_fast, gp_fast), (y64, gx64, gp64) = (
        results["reference"], results["fast"], results["float64"])
    assert y_fast.dtype == y_ref.dtype, f"output dtype {y_fast.dtype} vs original {y_ref.dtype}"
    assert gx_fast.dtype == gx_ref.dtype
    for n, g in gp_fast.items():
        assert g.dtype == gp_ref[n].dtype == torch.float32, f"grad {n}: {g.dtype}"
    floor = 1e-4  # a few fp32 roundings: below this both errors are noise
    for what, fast_t, ref_t, t64 in [("output", y_fast, y_ref, y64), ("grad x", gx_fast, gx_ref, gx64),
                                     *[(f"grad {n}", gp_fast[n], gp_ref[n], gp64[n]) for n in gp64]]:
        err, ref_err = rel_err(fast_t, t64), rel_err(ref_t, t64)
        assert err <= AMP_FACTOR * ref_err + floor, f"{what}: {err:.2e} vs original {ref_err:.2e} under {amp}"


@pytest.mark.parametrize("backend, amp", CASES, ids=IDS)
def test_autocast_saves_no_upcast_tensors(backend, amp, device):
    """The big tensors saved for backward (hidden-wide MLP tensors, q/k/v, attention output) stay
    in the autocast dtype, and the fast block saves fewer bytes than the original under autocast
    (at recompute="none", where autograd saves them itself; the recomputing levels are checked in
    test_recompute.py)."""
    l, b, T, d, h = 9, 2, 3, 64, 2
    ref = reference.CrossFramelAttentionBlock(d, h, T=T).to(device)
    fast = CrossFrameAttentionBlock(d, h, T=T, backend=backend, recompute="none").to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, device=device, requires_grad=True)

    def saved(module):
        tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append(t) or t, lambda t: t):
            with torch.autocast(_device_type(device), dtype=amp):
                module(x)
        return tensors

    fast_saved, ref_saved = saved(fast), saved(ref)
    hidden = [t for t in fast_saved if t.shape[-1] == 4 * d and t.numel() >= l * b * T * 4 * d]
    assert hidden, "the MLP's hidden-wide tensors were not found among the saved tensors"
    assert all(t.dtype == amp for t in hidden), [t.dtype for t in hidden]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in {id(t): t for t in ts}.values())  # noqa: E731
    assert nbytes(fast_saved) < nbytes(ref_saved), (nbytes(fast_saved), nbytes(ref_saved))


def _train(model, steps, amp, device, forward, scaler=None):
    """A few AdamW steps on fixed random data; returns the total parameter update."""
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        video = torch.randn(2, 3, 3, *forward.size, generator=g).to(device)
        target = torch.randn(2, forward.dim, generator=g).to(device)
        with torch.autocast(_device_type(device), dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = forward(model, video)
        loss = (out.float() - target).square().mean()
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - start


def _check_amp_training(make, forward, patch, backend, amp, device, steps=4):
    base = make().to(device).train()
    update32 = _train(copy.deepcopy(base), steps, None, device, forward)

    def scaler():  # fp16 needs loss scaling; a small initial scale avoids skipped first steps
        return torch.amp.GradScaler(_device_type(device), init_scale=256.0) if amp == torch.float16 else None

    update_ref = _train(copy.deepcopy(base), steps, amp, device, forward, scaler())
    update_fast = _train(patch(copy.deepcopy(base), backend), steps, amp, device, forward, scaler())
    err, ref_err = rel_err(update_fast, update32), rel_err(update_ref, update32)
    assert err <= AMP_FACTOR * ref_err, f"{steps} AdamW steps under {amp}: {err:.3e} vs original {ref_err:.3e}"


class _EncoderForward:
    size, dim = (16, 16), 32

    def __call__(self, model, video):
        return model(video)


class _HFForward:
    size, dim = (32, 32), 32

    def __call__(self, model, video):
        return model.get_video_features(pixel_values=video).pooler_output


def _set_encoder_backend(enc, backend):
    enc.backend = backend
    return enc


@pytest.mark.parametrize("backend, amp", CASES, ids=IDS)
def test_encoder_amp_training_tracks_float32(backend, amp, device):
    _check_amp_training(lambda: _tiny_encoder("reference"), _EncoderForward(), _set_encoder_backend, backend, amp,
                        device)


@pytest.mark.parametrize("backend, amp", CASES, ids=IDS)
def test_patched_hf_amp_training_tracks_float32(backend, amp, device):
    _check_amp_training(lambda: tiny_xclip(torch.float32), _HFForward(),
                        lambda m, be: xclip_fast.patch_xclip(m, backend=be), backend, amp, device)
