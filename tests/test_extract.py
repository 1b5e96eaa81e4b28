"""``xclip-fast encode`` at dataset scale: folders and lists, seeking, windows, resumable outputs,
failures recorded, non-file inputs refused, torchrun shards (generated videos, PyAV)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import assert_rel

from xclip_fast import extract, testing
from xclip_fast.cli import main
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.video import VideoError, VideoReader, preprocess

av = pytest.importorskip("av", reason="PyAV is needed to write and read test videos (pip install av)")


def write_video(path, n=40, rate=10, gop=10, codec="mpeg4", options=None):
    return testing.write_video(path, n, rate=rate, gop=gop, codec=codec, options=options)


def _weights(tmp_path, frames=4):
    torch.manual_seed(0)
    # 64-wide heads: official files carry no head count and the loader assumes the official width // 64
    enc = XCLIPVideoEncoder(input_resolution=32, patch_size=16, width=128, layers=1, heads=2, embed_dim=64,
                            num_frames=frames, mit_heads=1, backend="torch").eval()
    path = tmp_path / "w.pth"
    torch.save({"model": enc.state_dict()}, path)
    return enc, str(path)


def _encode(*argv):
    return main(["encode", "--device", "cpu", "--quiet", *map(str, argv)])


def _index(out_dir):
    with open(os.path.join(out_dir, "index.jsonl")) as f:
        return {os.path.basename(r["path"]): r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    (root / "b").mkdir()
    (root / "a").mkdir()
    write_video(root / "b" / "two.avi", n=30)
    write_video(root / "a" / "one.mp4", n=45)
    write_video(root / "a" / "three.mkv", n=20, codec="libx264")
    (root / "a" / "notes.txt").write_text("not a video")
    return root


def test_seeking_returns_the_frames_of_a_full_decode(tmp_path):
    path = write_video(tmp_path / "long.mp4", n=400, rate=25, gop=25)
    indices = [2, 130, 131, 399, 0, 260, 260]
    with VideoReader(path) as fast, VideoReader(path) as full:
        seeked, decoded = fast.frames(indices, seek=True), full.frames(indices, seek=False)
        assert fast.decoded < full.decoded / 3, (fast.decoded, full.decoded)
    for i, a, b in zip(indices, seeked, decoded):
        assert np.array_equal(a, b), f"frame {i}"


def test_folders_and_lists_in_a_stable_order(dataset, tmp_path):
    jobs = extract.discover([str(dataset)])
    assert [os.path.relpath(j.path, dataset) for j in jobs] == ["a/one.mp4", "a/three.mkv", "b/two.avi"]
    assert [j.name for j in jobs] == ["a/one.npy", "a/three.npy", "b/two.npy"]
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# a comment\n{dataset / 'b' / 'two.avi'}\n\n{dataset / 'a' / 'one.mp4'}\n")
    assert [os.path.basename(j.path) for j in extract.discover([], str(listing))] == ["two.avi", "one.mp4"]


def test_out_dir_per_video_embeddings_equal_the_encoder(dataset, tmp_path):
    enc, weights = _weights(tmp_path)
    out = tmp_path / "out"
    assert _encode(dataset, "--weights", weights, "--trust-weights", "--frames", 4, "--out-dir", out,
                   "--workers", 2, "--per-frame") == 0
    index = _index(out)
    assert set(index) == {"one.mp4", "three.mkv", "two.avi"} and all(r["status"] == "ok" for r in index.values())
    for name, rec in index.items():
        emb = np.load(out / rec["output"])
        assert emb.shape == (64,) and np.load(out / rec["output"].replace(".npy", ".frames.npy")).shape == (4, 64)
        with VideoReader(rec["path"]) as reader:
            _, rgb = reader.sample(4)
        video = torch.stack([preprocess(f, 32) for f in rgb])[None]
        with torch.no_grad():
            assert_rel(name, torch.from_numpy(emb)[None], enc(video), 1e-5)
        assert rec["frames_announced"] > 0 and rec["fps"] == 10.0 and rec["duration"] > 0


def test_sliding_windows_with_times(dataset, tmp_path):
    enc, weights = _weights(tmp_path, frames=4)
    out = tmp_path / "win"
    video = dataset / "a" / "one.mp4"  # 45 frames at 10 fps
    assert _encode(video, "--weights", weights, "--trust-weights", "--window", 8, "--stride", 4, "--out-dir", out,
                   "--workers", 0) == 0
    rec = _index(out)["one.mp4"]
    starts = list(range(0, 45 - 8 + 1, 4))
    assert rec["windows"] == [[s / 10, (s + 8) / 10] for s in starts]
    emb, times = np.load(out / "one.npy"), np.load(out / "one.times.npy")
    assert emb.shape == (len(starts), 64) and np.allclose(times, rec["windows"])
    with VideoReader(str(video)) as reader:
        rgb = reader.frames(list(range(12, 20)))  # window 3: frames 12..19
    with torch.no_grad():
        expected = enc(torch.stack([preprocess(f, 32) for f in rgb])[None])
    assert_rel("window 3", torch.from_numpy(emb[3])[None], expected, 1e-5)
    # in seconds at a chosen rate: 2 s windows every 1 s at 5 fps -> 10 frames per window
    out2 = tmp_path / "win-seconds"
    assert _encode(video, "--weights", weights, "--trust-weights", "--window", "2s", "--stride", "1s", "--fps", 5,
                   "--out-dir", out2, "--workers", 0) == 0
    assert _index(out2)["one.mp4"]["windows"][:3] == [[0.0, 2.0], [1.0, 3.0], [2.0, 4.0]]


def test_bad_files_are_recorded_and_the_run_goes_on(dataset, tmp_path, capsys):
    _, weights = _weights(tmp_path)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 1000)
    empty = write_video(tmp_path / "empty.avi", n=0)
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    code = _encode(dataset / "b" / "two.avi", bad, empty, fifo, "udp://127.0.0.1:1234", tmp_path / "missing.mp4",
                   "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 2)
    assert code == 1
    index = _index(out)
    assert index["two.avi"]["status"] == "ok"
    reasons = {name: index[name]["error"] for name in index if index[name]["status"] == "failed"}
    assert "cannot open" in reasons["broken.mp4"]
    assert "no frames" in reasons["empty.avi"]
    assert "not a regular file" in reasons["pipe.mp4"]
    assert "stream addresses are not read" in reasons["127.0.0.1:1234"]
    assert "no such file" in reasons["missing.mp4"]
    err = capsys.readouterr()
    assert "5 failed" in err.out and "error: " in err.err


def test_truncated_video_is_encoded_with_a_warning(tmp_path, capsys):
    _, weights = _weights(tmp_path)
    # the frame table at the front (faststart): a file cut in half still announces 60 frames
    full = write_video(tmp_path / "full.mp4", n=60, options={"movflags": "faststart"})
    data = open(full, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with VideoReader(str(cut)) as reader:
        assert reader.announced_frames() == 60
        indices, frames = reader.sample(4)
        assert reader.truncated and max(indices) < reader.readable_frames() < 60
    out = tmp_path / "out"
    assert _encode(cut, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0) == 0
    rec = _index(out)["cut.mp4"]
    assert rec["status"] == "truncated" and "announced frames" in rec["warnings"][0]
    assert "warning: " in capsys.readouterr().err


def test_resume_after_a_killed_run(dataset, tmp_path):
    """A kill leaves completed videos (their file and their line in the per-rank index) and perhaps a
    temporary file; the rerun encodes only the rest, removes the leftovers and merges one index."""
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    done = dataset / "a" / "one.mp4"
    assert _encode(done, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0) == 0
    os.rename(out / "index.jsonl", out / "index.rank0.jsonl")  # killed before the index was merged
    (out / "b").mkdir()
    (out / "b" / "two.npy.tmp-0.npy").write_bytes(b"half a file")
    before = os.stat(out / "one.npy").st_mtime_ns
    assert _encode(dataset, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 2) == 0
    index = _index(out)
    assert set(index) == {"one.mp4", "three.mkv", "two.avi"} and all(r["status"] == "ok" for r in index.values())
    assert os.stat(out / "one.npy").st_mtime_ns == before, "the video done before the kill was encoded again"
    assert (out / "b" / "two.npy").exists() and (out / "a" / "three.npy").exists()
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp-" in f or f.startswith("index.rank")]
    assert not leftovers, leftovers


def test_output_paths_are_checked_before_any_work(dataset, tmp_path, capsys):
    video = dataset / "b" / "two.avi"
    assert _encode(video, "--out", tmp_path / "emb.csv") == 2
    assert "must end in .npy" in capsys.readouterr().err
    assert _encode(video, "--out", tmp_path / "no" / "such" / "emb.npy") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _encode(video, "--window", 8, "--out", tmp_path / "w.npy") == 2
    assert "give --out-dir" in capsys.readouterr().err
    assert _encode(video, "--out", tmp_path / "a.npy", "--out-dir", tmp_path / "d") == 2
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "d").exists()


def test_single_array_keeps_input_order_with_nan_rows(dataset, tmp_path, capsys):
    _, weights = _weights(tmp_path)
    out = tmp_path / "emb.npy"
    code = _encode(dataset / "a" / "one.mp4", tmp_path / "missing.avi", dataset / "b" / "two.avi", "--weights",
                   weights, "--trust-weights", "--out", out, "--workers", 0)
    assert code == 1
    arr = np.load(out)
    assert arr.shape == (3, 64) and np.isnan(arr[1]).all() and np.isfinite(arr[[0, 2]]).all()
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU with gloo is tested on Linux")
def test_torchrun_shards_the_videos(dataset, tmp_path):
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "xclip_fast.cli", "encode", str(dataset), "--weights", weights, "--trust-weights",
                           "--out-dir", str(out), "--workers", "1", "--quiet", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    index = _index(out)
    assert set(index) == {"one.mp4", "three.mkv", "two.avi"}
    assert all(r["status"] == "ok" for r in index.values())
    assert not [f for f in os.listdir(out) if f.startswith("index.rank")]
    assert proc.stdout.count("encoded ") == 1  # one summary (rank 0)


def test_video_reader_refuses_non_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, message in [(tmp_path / "fifo", "not a regular file"), ("rtsp://camera/stream", "stream addresses"),
                          (tmp_path, "is a folder"), (tmp_path / "nope.mp4", "no such file")]:
        with pytest.raises(VideoError, match=message):
            VideoReader(str(path))


def test_long_windows_are_chunked_when_memory_is_short(tmp_path, monkeypatch):
    enc, _ = _weights(tmp_path)
    ex = extract.Extractor(enc, torch.device("cpu"), torch.float32, 4, 32)
    assert ex._chunk(8) is None and ex._chunk(512) is None  # short clips, or memory to spare
    monkeypatch.setattr(extract, "_free_cpu_memory", lambda: 4 * 2**20)  # 4 MiB free
    chunk = ex._chunk(512)
    assert chunk is not None and 1 <= chunk < 512
    frames = torch.randn(1, 40, 3, 32, 32)
    with torch.no_grad():  # the chunked forward gives the unchunked embedding
        assert_rel("chunked", enc(frames, chunk_frames=ex._chunk(40) or 40), enc(frames), 1e-5)
