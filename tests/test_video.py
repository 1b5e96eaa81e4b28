"""Video reading (PyAV), streaming encode and the ``xclip-fast encode`` command end to end."""

import numpy as np
import pytest
import torch
from _helpers import assert_rel, tiny_xclip

from xclip_fast.cli import main
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.testing import write_video
from xclip_fast.video import MEAN, STD, load_video, preprocess, read_frames, sample_indices

av = pytest.importorskip("av", reason="PyAV is needed to write and read test videos (pip install av)")

RED = [40 + 15 * i for i in range(12)]  # frame i has red level RED[i]


def _frame(i, w=64, h=48):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 0] = RED[i]
    x0 = (4 * i) % (w - 12)
    img[10:22, x0:x0 + 12, 1] = 255  # a moving green square
    return img


def _write_video(path, n=12):
    return write_video(path, n, _frame, rate=8, gop=12, width=64, height=48)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("videos") / "clip.avi")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "tiny-xclip"
    tiny_xclip(num_frames=4).save_pretrained(folder)
    return str(folder)


def test_sample_indices_follow_the_official_test_sampling():
    # avg_interval = total / T; offsets = int(i * avg_interval + avg_interval / 2)
    assert sample_indices(12, 5) == [1, 3, 6, 8, 10]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 5) == [0, 0, 1, 2, 2]  # short videos repeat frames
    with pytest.raises(ValueError, match="no frames"):
        sample_indices(0, 4)


def test_preprocess_resizes_crops_and_normalises():
    rgb = np.empty((48, 80, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    out = preprocess(rgb, 32)
    assert out.shape == (3, 32, 32)
    expected = (torch.tensor([200.0, 100.0, 50.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 32, 32))
    # the short side goes to int(256/224*32) = 36 first: a 1-pixel bar at the left edge of the
    # 80-wide frame lands outside the centre crop
    rgb[:, :2] = 0
    torch.testing.assert_close(preprocess(rgb, 32), out)


def test_read_frames_returns_the_sampled_frames_in_order(video):
    frames = list(read_frames(video, 5, 32))
    assert len(frames) == 5 and all(f.shape == (3, 32, 32) for f in frames)
    # red level of the bottom rows, away from the green square (4:2:0 chroma blurs its edges)
    red = [(f[0, -8:].mean() * STD[0] + MEAN[0]).item() for f in frames]
    for got, idx in zip(red, sample_indices(12, 5)):
        assert abs(got - RED[idx]) < 6, (got, RED[idx])  # lossy codec: a few levels of error


@pytest.mark.parametrize("chunk", [None, 3], ids=["unchunked", "chunk3"])
def test_encode_command_matches_the_in_memory_encoder(video, hf_folder, tmp_path, chunk):
    out = tmp_path / "emb.npy"
    argv = ["encode", video, video, "--weights", hf_folder, "--frames", "4", "--device", "cpu", "--dtype", "float32",
            "--backend", "torch",
            "--out", str(out), "--per-frame"]
    if chunk:
        argv += ["--chunk-frames", str(chunk)]
    assert main(argv) == 0
    got = np.load(out)
    frames = np.load(tmp_path / "emb_frames.npy")
    assert got.shape == (2, 32) and frames.shape == (2, 4, 32)
    enc = XCLIPVideoEncoder.from_hf(hf_folder, backend="torch").eval()
    with torch.no_grad():
        feats = enc.forward_features(load_video(video, 4, 32))
    # float32, the same model: only the order of operations differs (chunked GEMMs)
    assert_rel("video embedding", torch.from_numpy(got[0]), feats.video_embeds[0], 1e-5)
    assert_rel("frame embeddings", torch.from_numpy(frames[1]), feats.frame_embeds[0], 1e-5)


def test_encode_command_with_an_official_checkpoint(video, tmp_path):
    # official files carry no head counts: the official convention (64-wide heads) is assumed
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(input_resolution=32, patch_size=8, width=128, layers=2, heads=2, embed_dim=64,
                            num_frames=4, mit_heads=1, backend="torch").eval()
    path = tmp_path / "official.pth"
    torch.save({"model": enc.state_dict(), "epoch": 1}, path)
    out = tmp_path / "o.npy"
    assert main(["encode", video, "--weights", str(path), "--frames", "4", "--device", "cpu", "--dtype", "float32",
                 "--out", str(out)]) == 0
    with torch.no_grad():
        expected = enc(load_video(video, 4, 32))
    assert_rel("video embedding", torch.from_numpy(np.load(out)), expected, 1e-5)


def test_encode_errors_exit_non_zero(video, hf_folder, tmp_path, capsys):
    """A video that fails is reported and makes the exit code 1; bad options and weights make it 2."""
    bad = tmp_path / "notavideo.mp4"
    bad.write_text("hello")
    assert main(["encode", str(bad), "--weights", hf_folder, "--device", "cpu", "--out", str(tmp_path / "a.npy")]) == 1
    assert "cannot open" in capsys.readouterr().err
    empty = tmp_path / "empty.avi"
    _write_video(empty, n=0)
    assert main(["encode", str(empty), "--weights", hf_folder, "--device", "cpu",
                 "--out", str(tmp_path / "b.npy")]) == 1
    assert "no frames" in capsys.readouterr().err
    weird = tmp_path / "weights.pth"
    torch.save({"encoder.foo": torch.zeros(2)}, weird)
    assert main(["encode", video, "--weights", str(weird), "--device", "cpu", "--out", str(tmp_path / "c.npy")]) == 2
    assert "unknown weight format" in capsys.readouterr().err
    assert main(["encode", video, "--weights", str(tmp_path / "missing.pth"), "--device", "cpu"]) == 2


def test_encode_without_weights_says_so_loudly(video, tmp_path, capsys):
    out = tmp_path / "r.npy"
    assert main(["encode", video, "--frames", "2", "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.out and "RANDOM weights" in captured.err
    assert np.load(out).shape == (1, 512)


def test_encode_frames_checks_the_frame_count():
    enc = XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=64, layers=1, heads=2, embed_dim=32,
                            num_frames=3, mit_heads=2, backend="torch").eval()
    frames = torch.randn(3, 3, 16, 16)
    full = enc(frames[None])
    assert_rel("grouped frames", enc.encode_frames([frames[:2], frames[2]], 3).video_embeds, full, 1e-6)
    with pytest.raises(ValueError, match="expected num_frames=4 frames, got 3"):
        enc.encode_frames(iter(frames), 4)
    with pytest.raises(ValueError, match="more than num_frames=2"):
        enc.encode_frames(iter(frames), 2, chunk_frames=3)
