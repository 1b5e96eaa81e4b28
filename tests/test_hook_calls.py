"""Hooks see the calls the original makes: the same sub-modules, called as often, with the same shapes
and token order.

A hook that depends on the token position (ablating a token, a position-wise steering vector, an
activation recorder that reads the shape) gives the original's answer only if the fast path calls
the hooked module as the original does. Each case below hooks one sub-module of the original and of
the fast module with a probe that records every call (input and output shapes, forward and the
recomputations in backward) and changes its input and output by amounts that depend on the position
of each element in the tensor as the module receives it. The records must be equal and the outputs
and gradients the original's (float64).
"""

import copy

import pytest
import torch
from _helpers import assert_grads_close, assert_rel, needs_triton, tiny_xclip
from test_encoder import split_encoder_state_dict

import xclip_fast
from xclip_fast import reference
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.encoder import XCLIPVideoEncoder

F64_TOL = 1e-10  # float64 on both sides: rounding only
D, H, T, L, B = 32, 2, 3, 5, 2


def _ramp(t: torch.Tensor, size: float) -> torch.Tensor:
    """A different number for every position of ``t`` as laid out (its shape and element order)."""
    return size * torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype, device=t.device).view(t.shape)


def _probe(module: torch.nn.Module, name: str, log: list) -> None:
    """Record every call of ``module`` and change its floating-point inputs and its output by position."""

    def pre(m, args):
        log.append((name, "in", [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return tuple(a + _ramp(a, 0.1) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def post(m, args, out):
        first = out[0] if isinstance(out, tuple) else out
        log.append((name, "out", tuple(first.shape)))
        first = first * (1 + _ramp(first, 0.2))
        return (first, *out[1:]) if isinstance(out, tuple) else first

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def _step(model, run, log, grad_seed=2):
    """Forward, backward with fixed weights on the output; the output, every parameter's gradient and
    the calls made in backward (recomputations), which are taken out of ``log``."""
    out = run(model)
    calls = len(log)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(grad_seed)).to(out.device)
    (out * weights).sum().backward()
    again = log[calls:]
    del log[calls:]
    return out, [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad], again


def _check(case, ref, fast, run, log_ref, log_fast, plain_out, recomputes=False):
    """``recomputes``: the fast module checkpoints the frame path (level "block"), which calls its
    sub-modules again in backward, as the original under ``torch.utils.checkpoint`` does."""
    out_ref, grads_ref, again_ref = _step(ref, run, log_ref)
    out, grads, again = _step(fast, run, log_fast)
    assert log_fast == log_ref, f"{case}: the hook saw other calls\n fast:     {log_fast}\n original: {log_ref}"
    assert not again_ref
    assert again == (log_ref if recomputes else []), f"{case}: calls in backward: {again}"
    if log_ref:  # the probe changes the result: an ignored or misplaced hook cannot pass
        assert (out_ref - plain_out).abs().max() > 1e-7, f"{case}: the probe changes nothing"
    assert_rel(f"{case}: output", out, out_ref, F64_TOL)
    assert [n for n, _ in grads] == [n for n, _ in grads_ref]
    used = [(n, g, g_ref) for (n, g), (_, g_ref) in zip(grads, grads_ref) if g_ref is not None]
    assert_grads_close([u[0] for u in used], [u[1] for u in used], [u[2] for u in used], F64_TOL)


# ------------------------------------------------------------------------------------------------
# the official block: the message path's layouts ((b, T, d) and (T, b, d)), ln_1 on the
# concatenation (l+1, N, d), the MLP and its parts
# ------------------------------------------------------------------------------------------------
OFFICIAL = ["message_fc", "message_ln", "message_attn", "attn", "attn.out_proj", "ln_1", "ln_2", "mlp",
            "mlp.c_fc", "mlp.gelu", "mlp.c_proj"]


# every case on the torch backend; on triton (slow through the interpreter) the cases whose calls
# go around this library's attention or fused MLP
BLOCK_CASES = [(sub, "torch", level) for sub in OFFICIAL for level in ("lean", "none", "block")]
BLOCK_CASES += [pytest.param(sub, "triton", level, marks=needs_triton)
                for sub, level in (("ln_1", "lean"), ("message_ln", "lean"), ("mlp.c_fc", "lean"), ("ln_1", "block"))]


@pytest.mark.filterwarnings("ignore:xclip_fast.*original computation")
@pytest.mark.parametrize("sub, backend, recompute", BLOCK_CASES)
def test_hooks_on_a_block_see_the_original_calls(sub, backend, recompute, device):
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(D, H, T=T).to(device, torch.float64)
    fast = CrossFrameAttentionBlock(D, H, T=T, backend=backend, recompute=recompute).to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(L, B * T, D, dtype=torch.float64).to(device)
    plain_out = ref(x).detach()
    log_ref, log_fast = [], []
    _probe(ref.get_submodule(sub), sub, log_ref)
    _probe(fast.get_submodule(sub), sub, log_fast)
    _check(f"{sub} ({backend}, {recompute})", ref, fast, lambda m: m(x), log_ref, log_fast, plain_out,
           recomputes=recompute == "block" and sub not in ("message_fc", "message_ln"))  # (kept)


# ------------------------------------------------------------------------------------------------
# the encoder: conv1 and ln_pre see the whole clip in the official layout (N, l, d), also when the
# caller asks for chunks of frames; encode_frames, which must embed groups, refuses them
# ------------------------------------------------------------------------------------------------
def _encoders():
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=D, layers=2, heads=H, embed_dim=16,
                            num_frames=T, mit_heads=2, backend="torch").double()
    visual = reference.CrossFrameCommunicationTransformer(16, 8, D, 2, H, 16, T=T).double()
    mit = reference.MultiframeIntegrationTransformer(T, 16, 1, heads=2).double()
    visual_sd, mit_sd = split_encoder_state_dict(enc.state_dict())
    visual.load_state_dict(visual_sd)
    mit.load_state_dict(mit_sd)
    return enc, visual, mit


@pytest.mark.parametrize("chunk_frames", [None, 2])
@pytest.mark.parametrize("sub", ["conv1", "ln_pre", "ln_post", "transformer.resblocks.1.ln_1",
                                 "transformer.resblocks.0.message_ln", "transformer.resblocks.1.mlp.c_fc"])
def test_hooks_in_the_encoder_see_the_original_calls(sub, chunk_frames):
    enc, visual, mit = _encoders()
    enc.eval()
    video = torch.randn(B, T, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        plain_out = mit(visual(video.flatten(0, 1))[0].view(B, T, -1))
    log_ref, log_fast = [], []
    _probe(visual.get_submodule(sub), sub, log_ref)
    _probe(enc.visual.get_submodule(sub), sub, log_fast)
    with torch.no_grad():
        out_ref = mit(visual(video.flatten(0, 1))[0].view(B, T, -1))
        out = enc(video, chunk_frames=chunk_frames)
    assert log_fast == log_ref, f"{sub}: the hook saw other calls\n fast:     {log_fast}\n original: {log_ref}"
    assert (out_ref - plain_out).abs().max() > 1e-4, f"{sub}: the probe changes nothing"
    assert_rel(f"{sub}: video embedding", out, out_ref, F64_TOL)


def test_encode_frames_refuses_hooks_on_the_embedding():
    enc, _, _ = _encoders()
    enc.eval()
    enc.visual.ln_pre.register_forward_hook(lambda m, a, o: o)
    frames = torch.randn(T, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="visual.ln_pre has forward hooks.*groups of frames"):
        enc.encode_frames(iter(frames), T)


# ------------------------------------------------------------------------------------------------
# Hugging Face: every sub-module of a vision layer and of the MIT's layer
# ------------------------------------------------------------------------------------------------
VISION = "vision_model.encoder.layers.1."
HF = [VISION + s for s in ("message_fc", "message_ln", "message_attn.q_proj", "message_attn.k_proj",
                           "message_attn.v_proj", "message_attn.out_proj", "layer_norm1", "self_attn",
                           "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "layer_norm2", "mlp", "mlp.fc1", "mlp.activation_fn", "mlp.fc2")]
HF += ["mit.encoder.layers.0." + s for s in ("layer_norm1", "self_attn.q_proj", "self_attn.out_proj",
                                              "layer_norm2", "mlp.fc1")]


HF_CASES = [pytest.param(sub, "torch", id=sub.replace("vision_model.encoder.", "") + "-torch") for sub in HF]
HF_CASES += [pytest.param(VISION + sub, "triton", id=f"layers.1.{sub}-triton", marks=needs_triton)
             for sub in ("layer_norm1", "self_attn.q_proj", "self_attn.out_proj")]


@pytest.mark.filterwarnings("ignore:xclip_fast.*original computation")
@pytest.mark.parametrize("sub, backend", HF_CASES)
def test_hooks_on_a_hugging_face_model_see_the_original_calls(sub, backend, device):
    original = tiny_xclip(torch.float64, attn_implementation="sdpa").to(device)
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend=backend)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64).to(device)

    def run(m):
        return m.get_video_features(pixel_values=video).pooler_output

    with torch.no_grad():
        plain_out = run(original)
    log_ref, log_fast = [], []
    _probe(original.get_submodule(sub), sub, log_ref)
    _probe(patched.get_submodule(sub), sub, log_fast)
    _check(f"{sub} ({backend})", original, patched, run, log_ref, log_fast, plain_out)
