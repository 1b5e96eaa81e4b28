"""The video encoder against transformers' X-CLIP (the independent oracle) and the reference."""

import pytest
import torch
from _helpers import BACKENDS, assert_rel, tiny_xclip

from xclip_fast import reference
from xclip_fast.checkpoints import split_encoder_state_dict
from xclip_fast.encoder import PRESETS, XCLIPVideoEncoder, interpolate_frames

# float32: ~1e-7 rounding per op on both sides, accumulated through the layers.
# float64: the oracle runs sdpa attention (its eager path takes the softmax in float32), so both
# sides are float64 and only rounding differs.
HF_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ATTN = {torch.float32: "eager", torch.float64: "sdpa"}


def _video(b, T, dtype, device, size=32):
    return torch.randn(b, T, 3, size, size, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_from_hf_matches_transformers(backend, dtype, device):
    hf = tiny_xclip(dtype, attn_implementation=ATTN[dtype]).to(device)
    enc = XCLIPVideoEncoder.from_hf(hf, backend=backend).to(device).eval()
    video = _video(2, 3, dtype, device)
    with torch.no_grad():
        feats = enc.forward_features(video)
        vision = hf.vision_model(pixel_values=video.flatten(0, 1))
        frame_embeds = hf.visual_projection(vision.pooler_output).view(2, 3, -1)
        video_embeds = hf.get_video_features(pixel_values=video).pooler_output
    tol = HF_TOL[dtype]
    assert_rel("last hidden state", feats.last_hidden_state.flatten(0, 1), vision.last_hidden_state, tol)
    assert_rel("per-frame pooled output", feats.frame_embeds, frame_embeds, tol)
    with torch.no_grad():
        assert_rel("video embedding", enc(video), video_embeds, tol)
    assert_rel("forward_features video embedding", feats.video_embeds, video_embeds, tol)


def test_reference_modules_match_transformers(device):
    """The ground truth (reference.py, official structure) against the independent oracle."""
    hf = tiny_xclip(torch.float64, attn_implementation="sdpa").to(device)
    enc = XCLIPVideoEncoder.from_hf(hf)
    sd = enc.state_dict()
    visual = reference.CrossFrameCommunicationTransformer(32, 8, 64, 2, 2, 32, T=3).to(device, torch.float64)
    visual_sd, mit_sd = split_encoder_state_dict(sd)
    visual.load_state_dict(visual_sd)
    mit = reference.MultiframeIntegrationTransformer(3, 32, 1, heads=2).to(device, torch.float64)
    mit.load_state_dict(mit_sd)
    video = _video(2, 3, torch.float64, device)
    with torch.no_grad():
        cls, patches = visual(video.flatten(0, 1))
        out = mit(cls.view(2, 3, -1))
        hf_out = hf.get_video_features(pixel_values=video)
    assert_rel("reference patch tokens", patches, hf_out.last_hidden_state[:, 1:], HF_TOL[torch.float64])
    assert_rel("reference video embedding", out, hf_out.pooler_output, HF_TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_encoder_matches_reference_float64_with_gradients(backend, device):
    """Outputs and every parameter gradient against the reference modules, in float64."""
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32,
                            num_frames=3, mit_heads=2, backend=backend).to(device, torch.float64)
    sd = enc.state_dict()
    visual = reference.CrossFrameCommunicationTransformer(16, 8, 64, 2, 2, 32, T=3).to(device, torch.float64)
    visual_sd, mit_sd = split_encoder_state_dict(sd)
    visual.load_state_dict(visual_sd)
    mit = reference.MultiframeIntegrationTransformer(3, 32, 1, heads=2).to(device, torch.float64)
    mit.load_state_dict(mit_sd)
    video = _video(2, 3, torch.float64, device, size=16)
    out = enc(video)
    cls, _ = visual(video.flatten(0, 1))
    ref = mit(cls.view(2, 3, -1))
    assert_rel("video embedding", out, ref, 1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    ref_grads = {f"visual.{k}": p.grad for k, p in visual.named_parameters()}
    ref_grads.update({f"mit.{k}": p.grad for k, p in mit.named_parameters()})
    for name, p in enc.named_parameters():
        assert_rel(f"grad {name}", p.grad, ref_grads[name], 1e-10)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_any_frame_count_matches_reference_with_interpolated_positions(T, device):
    """T != trained T: the reference (built for T frames) with the MIT position embedding resampled
    by numpy's linear interpolation over [0, trained T - 1] (align_corners) is the oracle."""
    import numpy as np

    hf = tiny_xclip(torch.float64, num_frames=3, attn_implementation="sdpa").to(device)
    enc = XCLIPVideoEncoder.from_hf(hf, backend="torch").to(device)
    sd = enc.state_dict()
    visual = reference.CrossFrameCommunicationTransformer(32, 8, 64, 2, 2, 32, T=T).to(device, torch.float64)
    visual_sd, mit_sd = split_encoder_state_dict(sd)
    visual.load_state_dict(visual_sd)
    mit = reference.MultiframeIntegrationTransformer(T, 32, 1, heads=2).to(device, torch.float64)
    pos = sd["mit.positional_embedding"][0].cpu().numpy()  # (3, E)
    where = np.linspace(0, pos.shape[0] - 1, T)
    resampled = np.stack([np.interp(where, np.arange(pos.shape[0]), pos[:, e]) for e in range(pos.shape[1])], 1)
    mit_sd["positional_embedding"] = torch.from_numpy(resampled)[None]
    mit.load_state_dict(mit_sd)
    video = _video(2, T, torch.float64, device)
    with torch.no_grad():
        out = enc(video)
        ref = mit(visual(video.flatten(0, 1))[0].view(2, T, -1))
    assert out.shape == (2, 32)
    assert_rel(f"video embedding at T={T}", out, ref, 1e-12)


def test_position_embedding_interpolation():
    pos = torch.randn(1, 4, 6, dtype=torch.float64)
    assert interpolate_frames(pos, 4) is pos  # the trained length is used exactly as trained
    fine = interpolate_frames(pos, 7)  # align_corners: every second point is an original one
    torch.testing.assert_close(fine[:, ::2], pos)
    torch.testing.assert_close(fine[:, 1], (pos[:, 0] + pos[:, 1]) / 2)
    coarse = interpolate_frames(pos, 2)
    torch.testing.assert_close(coarse, pos[:, [0, 3]])


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 32, 32), "video must be 5-D"),
        ((1, 2, 3, 3, 32, 32), "video must be 5-D"),
        ((1, 2, 3, 16, 16), "expected 32x32 images, got 16x16"),
        ((1, 2, 4, 32, 32), "expected 3 channels"),
        ((1, 2, 3, 32, 24), "expected 32x32 images, got 32x24"),
        ((0, 2, 3, 32, 32), "at least one clip and one frame"),
    ],
)
def test_bad_video_raises(shape, match):
    enc = XCLIPVideoEncoder(input_resolution=32, patch_size=8, width=64, layers=1, heads=2, embed_dim=32,
                            num_frames=2, mit_heads=2, backend="torch")
    with pytest.raises(ValueError, match=match):
        enc(torch.randn(*shape))


def test_bad_chunk_frames_raises():
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=1, heads=2, embed_dim=32,
                            num_frames=2, mit_heads=2, backend="torch")
    with torch.no_grad(), pytest.raises(ValueError, match=r"chunk_frames must be an int >= 1 \(or None\), got 0"):
        enc(torch.randn(1, 2, 3, 16, 16), chunk_frames=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_released_shapes(name):
    # the released configs (DESIGN.md §1): tokens per frame l, width d, embed E, layers, heads
    released = {"b32": (50, 768, 512, 12, 12, 8), "b16": (197, 768, 512, 12, 12, 8),
                "l14": (257, 1024, 768, 24, 16, 8), "l14-336": (577, 1024, 768, 24, 16, 16)}
    l, d, E, layers, heads, T = released[name]
    with torch.device("meta"):
        enc = XCLIPVideoEncoder.from_config(name)
    assert enc.visual.positional_embedding.shape == (l, d)
    assert enc.visual.proj.shape == (d, E)
    assert len(enc.visual.transformer.resblocks) == layers
    assert all(b.attn.num_heads == heads and b.attn.head_dim == 64 for b in enc.visual.transformer.resblocks)
    assert enc.mit.positional_embedding.shape == (1, T, E)
    assert enc.mit.resblocks[0].attn.num_heads == E // 64
    with torch.device("meta"):
        assert XCLIPVideoEncoder.from_config(name, num_frames=32).mit.positional_embedding.shape == (1, 32, E)
    with pytest.raises(ValueError, match="unknown preset"):
        XCLIPVideoEncoder.from_config("vit-h")


def test_drop_path_rates_follow_the_official_schedule():
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=4, heads=2, embed_dim=32,
                            num_frames=2, mit_heads=2, droppath=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.visual.transformer.resblocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_backend_propagates_to_every_block():
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32,
                            num_frames=2, mit_heads=2, backend="torch")
    enc.backend = "reference"
    assert all(b.backend == "reference" for b in enc.visual.transformer.resblocks)
    assert enc.mit.resblocks[0].backend == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        enc.backend = "gpu"
