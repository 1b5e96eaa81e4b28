"""The recompute levels: what a block keeps for its backward. Every level computes exactly what the
original computes (float64, drop path on), composes with autocast, torch.compile, chunked frames and
Hugging Face patching, and keeps no more than its targets (held bytes and matmul FLOPs of one B/32
block, measured against the original block in the same run)."""

import functools

import pytest
import torch
from _helpers import BACKENDS, assert_grads_close, assert_rel, tiny_xclip
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import xclip_fast
from xclip_fast import reference
from xclip_fast.bench.memory import StorageTracker, held_bytes, matmul_flops
from xclip_fast.bench.train import save_matmuls
from xclip_fast.blocks import CrossFrameAttentionBlock, ResidualAttentionBlock
from xclip_fast.checkpoints import split_encoder_state_dict
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.functional import RECOMPUTE_LEVELS
from xclip_fast.testing import TOLERANCES

LEVELS = list(RECOMPUTE_LEVELS)
EXACT = 1e-10  # float64 on both sides: only the order of a few sums differs


def _fwd_bwd(module, x, seed, *args):
    """Output, input gradient and parameter gradients of one forward + backward (drop path seeded)."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = module(x, *args)
    g = torch.Generator().manual_seed(seed + 1)
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device))
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_levels_equal_the_original(backend, level, device):
    l, b, T, d, h = 7, 2, 3, 64, 2
    ref = reference.CrossFramelAttentionBlock(d, h, None, 0.4, T).double().to(device).train()
    fast = CrossFrameAttentionBlock(d, h, None, 0.4, T, backend=backend, recompute=level).double().to(device).train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, b * T, d, dtype=torch.float64, device=device)
    y_ref, g_ref = _fwd_bwd(ref, x, 3)
    y, g = _fwd_bwd(fast, x, 3)
    assert_rel("output", y, y_ref, EXACT)
    names = ["x"] + [n for n, _ in fast.named_parameters()]
    assert_grads_close(names, g, g_ref, EXACT)
    no_drop = _fwd_bwd(ref, x, 4)[0]
    assert (no_drop - y_ref).abs().max() > 1e-3, "drop path did not drop anything: the test shows nothing"


@pytest.mark.parametrize("level", LEVELS)
def test_mit_block_levels_equal_the_original(level):
    S, B, d, h = 5, 3, 32, 2
    ref = reference.ResidualAttentionBlock(d, h).double().train()
    fast = ResidualAttentionBlock(d, h, backend="torch", recompute=level).double().train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(S, B, d, dtype=torch.float64)
    y_ref, g_ref = _fwd_bwd(ref, x, 0)
    y, g = _fwd_bwd(fast, x, 0)
    assert_rel("output", y, y_ref, EXACT)
    assert_grads_close(["x"] + [n for n, _ in fast.named_parameters()], g, g_ref, EXACT)


def _tiny(backend="torch", **kw):
    torch.manual_seed(0)
    cfg = dict(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32, num_frames=3,
               mit_heads=2, droppath=0.3)
    return XCLIPVideoEncoder(**cfg, backend=backend, **kw).double()


@pytest.mark.parametrize("level", LEVELS)
def test_encoder_levels_equal_the_original(level):
    enc = _tiny(recompute=level).train()
    assert {m.recompute for m in enc.modules() if hasattr(m, "_recompute")} == {level}
    dpr = [x.item() for x in torch.linspace(0, 0.3, 2)]
    visual = reference.CrossFrameCommunicationTransformer(16, 8, 64, 2, 2, 32, dpr, 3).double().train()
    mit = reference.MultiframeIntegrationTransformer(3, 32, 1, 2).double().train()
    visual_sd, mit_sd = split_encoder_state_dict(enc.state_dict())
    visual.load_state_dict(visual_sd)
    mit.load_state_dict(mit_sd)
    video = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    ref_params = list(visual.parameters()) + list(mit.parameters())
    outs, grads = [], []
    for run, params in ((lambda v: mit(visual(v.flatten(0, 1))[0].view(2, 3, -1)), ref_params),
                        (enc, list(enc.parameters()))):
        v = video.clone().requires_grad_()
        torch.manual_seed(5)
        out = run(v)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([v.grad] + [p.grad for p in params])
    assert_rel("video embedding", outs[1], outs[0], EXACT)
    names = ["video"] + [n for n, _ in enc.named_parameters()]
    assert len(grads[0]) == len(grads[1])
    assert_grads_close(names, grads[1], grads[0], EXACT)


def test_knob_validation_and_the_checkpoint_alias():
    with pytest.raises(ValueError, match="recompute must be one of"):
        CrossFrameAttentionBlock(32, 2, T=2, recompute="all")
    with pytest.raises(ValueError, match="recompute must be one of"):
        _tiny(recompute="max")
    with pytest.raises(ValueError, match="use_checkpoint=True means recompute='block'"):
        _tiny(use_checkpoint=True, recompute="min")
    enc = _tiny(use_checkpoint=True)
    assert enc.recompute == "block" and enc.use_checkpoint and enc.visual.use_checkpoint
    assert all(b.recompute == "block" for b in enc.visual.blocks)
    enc.use_checkpoint = False
    assert enc.recompute == "lean" and all(b.recompute == "lean" for b in enc.modules() if hasattr(b, "_recompute"))
    enc.recompute = "min"
    enc.visual.use_checkpoint = False  # not "block": unchanged
    assert enc.visual.recompute == "min"
    with pytest.raises(ValueError, match="recompute must be one of"):
        enc.recompute = None


def test_hooks_on_sub_modules_are_called_once_unless_the_whole_block_is_checkpointed():
    """A forward hook on a sub-module the fast path calls (ln_1: on the frame tokens and on the
    message token) sees the calls of one forward per training step at lean and min (they keep
    everything then, rather than calling it again in backward); "block" is whole-module
    checkpointing, which calls it again, as PyTorch's checkpoint does."""
    block = CrossFrameAttentionBlock(32, 2, T=2, backend="torch").double().train()
    seen = []
    block.ln_1.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    x = torch.randn(5, 4, 32, dtype=torch.float64, requires_grad=True)
    calls = {}
    for level in LEVELS:
        block.recompute = level
        seen.clear()
        block(x).sum().backward()
        calls[level] = list(seen)
    assert calls["none"] == [(5, 4, 32), (4, 32)], calls
    assert calls["lean"] == calls["min"] == calls["none"], calls
    assert calls["block"] == calls["none"] * 2, calls


def test_lean_keeps_the_pre_activation_of_an_unfused_mlp():
    """A block whose MLP runs as its module (hidden_act="gelu", not fused) still keeps its
    pre-activation at lean: only the out-projection is recomputed, as for the fused MLP."""
    l, b, T, d, h = 9, 2, 2, 64, 2
    block = CrossFrameAttentionBlock(d, h, T=T, backend="torch", hidden_act="gelu").double().train()
    x = torch.randn(l, b * T, d, dtype=torch.float64, requires_grad=True)
    flops = {}
    for level in ("none", "lean", "min"):
        block.recompute = level
        flops[level] = matmul_flops(lambda x: block(x).sum().backward(), x)
    frames, tokens = b * T, l * b * T
    out_proj, fc1 = 2 * d * d * tokens, 2 * d * 4 * d * tokens
    # d-wide GEMMs of the message path (one token per frame): message_fc, the message attention's
    # out-projection, and the message token's key/value in the frame attention (2d wide)
    message = 2 * (d * d + d * d + d * 2 * d) * frames
    assert flops["lean"] - flops["none"] == out_proj + message, flops
    assert flops["min"] - flops["lean"] == fc1, flops


def test_inference_keeps_nothing_whatever_the_level():
    """Under no_grad (and for frozen weights with an input that needs no grad) no level checkpoints:
    the forward is the plain one and keeps nothing."""
    l, b, T, d, h = 9, 2, 4, 64, 2
    block = CrossFrameAttentionBlock(d, h, T=T, backend="torch").double()
    x = torch.randn(l, b * T, d, dtype=torch.float64)
    for level in LEVELS:
        block.recompute = level
        with torch.no_grad():
            out, held = held_bytes(block, x, keep=[block])
        assert held == 0, (level, held)
        block.requires_grad_(False)
        out, held = held_bytes(block, x, keep=[block])
        assert held == 0 and not out.requires_grad, (level, held)
        block.requires_grad_(True)


@pytest.mark.parametrize("level", ["lean", "min"])
def test_autocast_keeps_the_autocast_dtype(level, device):
    """Under bf16 autocast the kept tensors are bf16 (none upcast), and the result tracks the
    level "none" within the bf16 tolerance."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    l, b, T, d, h = 9, 2, 3, 64, 2
    block = CrossFrameAttentionBlock(d, h, T=T, backend="torch", recompute=level).to(device)
    plain = CrossFrameAttentionBlock(d, h, T=T, backend="torch", recompute="none").to(device)
    plain.load_state_dict(block.state_dict())
    x = torch.randn(l, b * T, d, device=device, requires_grad=True)
    tracker = StorageTracker()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with tracker:
            y = block(x)
        y_plain = plain(x)
    keep = [x, y, *block.parameters()]
    row = l * b * T * d  # elements of one d-wide row per token
    kept_fp32 = tracker.live(keep, dtype=torch.float32)
    # q/k/v and the attention output alone are 4 rows (bf16: 2 bytes each)
    assert tracker.live(keep, dtype=torch.bfloat16) >= 4 * row * 2, "the bf16 q/k/v were not kept"
    # float32 may hold only the message path's few tokens (b*T of them, against l*b*T frame tokens)
    assert kept_fp32 < row, f"{kept_fp32} bytes kept in float32 (an upcast d-wide tensor?)"
    tol = TOLERANCES[torch.bfloat16]
    assert_rel("output", y.float(), y_plain.float(), tol)
    g = torch.randn_like(y.float())
    gx = torch.autograd.grad(y.float(), x, g)[0]
    gx_plain = torch.autograd.grad(y_plain.float(), x, g)[0]
    assert_rel("grad x", gx, gx_plain, tol)


# Inductor draws random numbers with its own generator unless told to call torch's: then the drop path
# masks are eager's, and the recomputation must reuse them rather than draw new ones
@torch._inductor.config.patch(fallback_random=True)
@pytest.mark.parametrize("level", ["min", "block"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_levels_compile_fullgraph(backend, level, device):
    """lean is the default and already compiled by test_compile.py; here the other recomputing
    levels, with drop path on: one graph, no break, the gradients of the eager run."""
    from test_compile import _compiler, _grads, _no_graph_break

    block = CrossFrameAttentionBlock(64, 2, None, 0.3, T=3, backend=backend, recompute=level).to(device).train()
    x = torch.randn(7, 6, 64, device=device)
    _no_graph_break(block, x)
    compiled = torch.compile(block, backend=_compiler(backend), fullgraph=True)
    params = list(block.parameters())
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    ye = block(xe)
    torch.manual_seed(1)
    yc = compiled(xc)
    tol = TOLERANCES[torch.float32]
    assert_rel("output", yc, ye, tol)
    grad = torch.randn_like(ye)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    assert_grads_close(names, _grads(yc, [xc, *params], grad), _grads(ye, [xe, *params], grad), tol)


@pytest.mark.parametrize("level", ["min", "block"])
def test_chunked_inference_with_any_level(level):
    enc = _tiny(recompute=level).eval()
    video = torch.randn(2, 5, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        full = enc(video)
        chunked = enc(video, chunk_frames=2)
    assert_rel("video embedding", chunked, full, 1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_patched_hf_levels_equal_the_unpatched_model(level):
    """A patched Hugging Face model at every level: the same outputs and gradients as the original."""
    model = tiny_xclip(torch.float64, attn_implementation="sdpa").train()
    for layer in model.vision_model.encoder.layers:
        layer.drop_path.drop_prob = 0.3  # Hugging Face's drop path of the message branch
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith(("text_model", "prompts"))]
    results = []
    for patched in (False, True):
        if patched:
            xclip_fast.patch_xclip(model, backend="torch", recompute=level)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        out = model.get_video_features(pixel_values=video).pooler_output
        out.backward(torch.ones_like(out))
        results.append((out.detach(), [p.grad for _, p in named]))
    assert {m.xclip_fast_recompute for m in model.modules() if hasattr(m, "xclip_fast_recompute")} == {level}
    assert_rel("pooler_output", results[1][0], results[0][0], EXACT)
    assert_grads_close([n for n, _ in named], results[1][1], results[0][1], EXACT)
    xclip_fast.hf.set_recompute(model, "none")
    assert {m.xclip_fast_recompute for m in model.modules() if hasattr(m, "xclip_fast_recompute")} == {"none"}
    with pytest.raises(ValueError, match="recompute must be one of"):
        xclip_fast.hf.set_recompute(model, "everything")


# ------------------------------------------------------------------------------------------------
# the targets: held bytes and matmul FLOPs of one B/32 block against the original, in one run
# ------------------------------------------------------------------------------------------------
def _cost(fn, x, keep):
    out, held = held_bytes(fn, x, keep=keep)
    del out

    def step(x):
        y = fn(x)
        y.backward(torch.ones_like(y))
    return held, matmul_flops(step, x)


def test_held_bytes_and_flops_meet_the_targets():
    """B/32 sizes (l=50, T=8, d=768, 12 heads), float32, torch backend: lean keeps <= 0.42x the
    original's bytes (<= 0.85x stock selective checkpointing) for <= 1.04x its matmul FLOPs; min
    <= 0.22x for <= 1.15x; block keeps nothing."""
    torch.manual_seed(0)
    l, T, d, h = 50, 8, 768, 12
    ref = reference.CrossFramelAttentionBlock(d, h, None, 0.0, T).train()
    fast = CrossFrameAttentionBlock(d, h, None, 0.0, T, backend="torch").train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(l, T, d, requires_grad=True)
    keep = [ref, fast]
    sac = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
    held0, flops0 = _cost(ref, x, keep)
    held_sac, flops_sac = _cost(lambda x: checkpoint(ref, x, use_reentrant=False, context_fn=sac), x, keep)
    costs = {}
    for level in LEVELS:
        fast.recompute = level
        costs[level] = _cost(fast, x, keep)
    row = d * l * T * 4  # one d-wide float32 row per token
    assert 18 * row < held0 < 22 * row, f"the original keeps {held0 / row:.1f} rows per token, not about 20"
    assert flops_sac == flops0
    ratio = {k: (h / held0, f / flops0) for k, (h, f) in costs.items()}
    assert ratio["lean"][0] <= 0.42 and ratio["lean"][1] <= 1.04, ratio
    assert costs["lean"][0] <= 0.85 * held_sac, (costs["lean"][0], held_sac)
    assert ratio["min"][0] <= 0.22 and ratio["min"][1] <= 1.15, ratio
    assert ratio["block"][0] <= 0.01, ratio
    assert ratio["none"][1] <= 1.0 and ratio["lean"][0] < ratio["none"][0], ratio
