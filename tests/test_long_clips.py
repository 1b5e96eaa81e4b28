"""Long clips: chunked inference equals the unchunked forward; checkpointing keeps the gradients."""

import pytest
import torch
from _helpers import BACKENDS, assert_rel

from xclip_fast.encoder import XCLIPVideoEncoder


def _encoder(backend, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = dict(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32, num_frames=4,
               mit_heads=2)
    cfg.update(kw)
    return XCLIPVideoEncoder(**cfg, backend=backend).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 100], ids=lambda k: f"k{k}")
def test_chunked_inference_equals_unchunked(backend, chunk, device):
    enc = _encoder(backend).to(device).eval()
    video = torch.randn(2, 7, 3, 16, 16, dtype=torch.float64, device=device)  # T=7: k=3 does not divide it
    with torch.inference_mode():
        full = enc.forward_features(video)
        chunked = enc.forward_features(video, chunk_frames=chunk)
    # float64 on both sides; the chunked run only changes which frames share a GEMM
    for name in ("video_embeds", "frame_embeds", "last_hidden_state"):
        assert_rel(name, getattr(chunked, name), getattr(full, name), 1e-12)


def test_chunked_inference_refuses_autograd():
    enc = _encoder("torch")
    video = torch.randn(1, 2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_frames is for inference"):
        enc(video, chunk_frames=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_gives_the_same_gradients(backend, device):
    plain = _encoder(backend, droppath=0.2).to(device).train()
    ckpt = _encoder(backend, droppath=0.2, use_checkpoint=True).to(device).train()
    ckpt.load_state_dict(plain.state_dict())
    video = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64, device=device)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # drop path draws the same masks (checkpoint replays the RNG state)
        out = model(video)
        out.backward(torch.ones_like(out))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert_rel(f"grad {name}", grads[1][name], g, 1e-12)
