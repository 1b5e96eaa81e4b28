"""``xclip-fast encode`` at dataset scale: folders and lists, seeking, windows, resumable outputs,
failures recorded, non-file inputs refused, torchrun shards (generated videos, PyAV)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import assert_rel

from xclip_fast import extract, testing
from xclip_fast.cli import main
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.extract import extractor
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
    return main(["encode", "--device", "cpu", "--dtype", "float32", "--quiet", *map(str, argv)])


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
    listing.write_text(f"{dataset / 'b' / 'two.avi'}\n\n  {dataset / 'a' / 'one.mp4'}  \n#take1.mp4\n")
    jobs = extract.discover([], str(listing))
    # every non-blank line is a video (no comment syntax: '#take1.mp4' is a file name, here a missing one)
    assert [os.path.basename(j.path) for j in jobs] == ["two.avi", "one.mp4", "#take1.mp4"]
    assert "no such file" in jobs[2].error and not jobs[0].error


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
    """A kill leaves completed videos (their file and their line in the per-rank log) and perhaps a
    temporary file; the rerun encodes only the rest, removes its own leftovers (and nothing else)
    and merges one index."""
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    done = dataset / "a" / "one.mp4"
    assert _encode(done, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0) == 0
    state = out / extract.STATE
    os.rename(out / "index.jsonl", state / "index.rank0.jsonl")  # killed before the index was merged
    (state / "tmp" / f"rank0-{'ab' * 16}.npy").write_bytes(b"half a file")
    (out / "b").mkdir()
    (out / "b" / "notes.tmp-v2.txt").write_text("the user's")  # not ours: must survive
    before = os.stat(out / "one.npy").st_mtime_ns
    assert _encode(dataset, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 2) == 0
    index = _index(out)
    assert set(index) == {"one.mp4", "three.mkv", "two.avi"} and all(r["status"] == "ok" for r in index.values())
    assert os.stat(out / "one.npy").st_mtime_ns == before, "the video done before the kill was encoded again"
    assert (out / "b" / "two.npy").exists() and (out / "a" / "three.npy").exists()
    assert (out / "b" / "notes.tmp-v2.txt").read_text() == "the user's"
    # (the lock stays: removing a file others may have opened to lock would let two runs hold it)
    leftovers = [f for _, _, files in os.walk(state) for f in files if f != "lock"]
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
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "xclip_fast.cli", "encode", str(dataset), "--weights", weights, "--trust-weights", "--out-dir", str(out),
            "--workers", "1", "--quiet", "--device", "cpu"]
    held = extract.lock_out_dir(str(out))  # another run writes there: every rank stops (rank 0 says why)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    finally:
        held.close()
    assert proc.returncode != 0 and "in use by another xclip-fast encode run" in proc.stderr, proc.stderr[-4000:]
    assert not (out / "index.jsonl").exists()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    index = _index(out)
    assert set(index) == {"one.mp4", "three.mkv", "two.avi"}
    assert all(r["status"] == "ok" for r in index.values())
    assert not [f for f in os.listdir(out) if f.startswith("index.rank")]
    assert proc.stdout.count("encoded ") == 1  # one summary (rank 0)


def _cli(*argv) -> list:
    return [sys.executable, "-m", "xclip_fast.cli", "encode", *map(str, argv), "--quiet", "--device", "cpu",
            "--dtype", "float32"]


def test_a_second_run_into_one_out_dir_is_refused_while_the_first_runs(dataset, tmp_path, capsys):
    """The run writing into an --out-dir holds its lock (here this process, as another run would):
    a second run is refused before any work, naming the holder and what to do if it is stale; once
    the holder ends, the run goes on."""
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    argv = [dataset / "a" / "one.mp4", "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0]
    held = extract.lock_out_dir(str(out))
    try:
        assert _encode(*argv) == 2
        err = capsys.readouterr().err
        assert f"is in use by another xclip-fast encode run (pid {os.getpid()} on " in err
        assert "remove " + os.path.join(str(out), extract.STATE, "lock") in err
        assert not (out / "index.jsonl").exists() and not (out / "one.npy").exists()
    finally:
        held.close()
    assert _encode(*argv) == 0
    assert set(_index(out)) == {"one.mp4"}
    extract.lock_out_dir(str(out)).close()  # (the run let it go)


def test_two_runs_at_once_into_one_out_dir_never_mix(tmp_path):
    """Two folders with the same relative names (different videos), encoded by two processes into one
    --out-dir at once: each run either completes or is refused (exit 2, naming the other); every
    record of the index holds its own video's embedding, and a rerun of each completes it."""
    N = 12
    enc, weights = _weights(tmp_path)
    out = tmp_path / "out"
    for folder, rate in (("x", 10), ("y", 5)):
        (tmp_path / folder).mkdir()
        for i in range(N):
            write_video(tmp_path / folder / f"a{i}.mp4", n=8 + i, rate=rate)
    runs = [subprocess.Popen(_cli(tmp_path / folder, "--weights", weights, "--trust-weights", "--out-dir", out,
                                  "--workers", 0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for folder in ("x", "y")]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in runs]
    for code, stdout, stderr in results:
        assert code == 0 or (code == 2 and "in use by another xclip-fast encode run" in stderr), stdout + stderr
    assert any(code == 0 for code, _, _ in results)

    def check(folders):
        with open(out / "index.jsonl") as f:
            records = {r["source"]["path"]: r for r in map(json.loads, f)}
        for folder in folders:  # every video of a completed run has its record, holding its embedding
            for i in range(N):
                video = str((tmp_path / folder / f"a{i}.mp4").resolve())
                assert video in records, f"{video}: no record"
                assert_rel(video, torch.from_numpy(np.load(out / records[video]["output"])), expected[video], 1e-5)
        assert len({r["output"] for r in records.values()}) == len(records)

    expected = {str((tmp_path / f / f"a{i}.mp4").resolve()): _expected(enc, tmp_path / f / f"a{i}.mp4", 4)
                for f in ("x", "y") for i in range(N)}
    check([folder for folder, (code, _, _) in zip(("x", "y"), results) if code == 0])
    for folder in ("x", "y"):  # then a rerun of each, as a user told to would
        subprocess.run(_cli(tmp_path / folder, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers",
                            0), check=True, capture_output=True)
    check(["x", "y"])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_links_to_one_video_and_reordered_name_clashes_encode_once(tmp_path, capsys):
    """``one/a.mp4`` and two links to it: one encode, one output, one record, and nothing on the
    rerun; ``p/x.mp4`` and ``q/x.mp4`` given as (p, q), then (q, p) twice: nothing encoded again and
    no output left that no record names."""
    enc, weights = _weights(tmp_path)
    out = tmp_path / "out"
    for sub in ("one", "p", "q"):
        (tmp_path / sub).mkdir()
    write_video(tmp_path / "one" / "a.mp4", n=12)
    for link in ("b.mp4", "c.mp4"):
        os.symlink(tmp_path / "one" / "a.mp4", tmp_path / "one" / link)
    write_video(tmp_path / "p" / "x.mp4", n=12)
    write_video(tmp_path / "q" / "x.mp4", n=16, rate=5)
    base = ["--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0]
    p, q = tmp_path / "p" / "x.mp4", tmp_path / "q" / "x.mp4"
    for videos, encoded in (([tmp_path / "one"], 1), ([tmp_path / "one"], 0), ([p, q], 2), ([q, p], 0), ([q, p], 0)):
        assert _encode(*videos, *base) == 0
        assert f"encoded {encoded} video(s)" in capsys.readouterr().out, videos
    with open(out / "index.jsonl") as f:
        records = [json.loads(line) for line in f]
    outputs = sorted(str(f.relative_to(out)) for f in out.rglob("*.npy") if extract.STATE not in f.parts)
    assert sorted(r["output"] for r in records) == outputs and len(outputs) == 3
    for rec in records:
        assert_rel(rec["output"], torch.from_numpy(np.load(out / rec["output"])),
                   _expected(enc, rec["source"]["path"], 4), 1e-5)


def test_video_reader_refuses_non_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, message in [(tmp_path / "fifo", "not a regular file"), ("rtsp://camera/stream", "stream addresses"),
                          (tmp_path, "is a folder"), (tmp_path / "nope.mp4", "no such file")]:
        with pytest.raises(VideoError, match=message):
            VideoReader(str(path))


def test_long_windows_are_chunked_when_memory_is_short(tmp_path, monkeypatch):
    enc, _ = _weights(tmp_path)

    def chunk(frames):
        return extract.chunk_for(enc.config, frames, 1, torch.float32, torch.device("cpu"))

    assert chunk(8) is None and chunk(512) is None  # short clips, or memory to spare
    monkeypatch.setattr(extractor, "_free_cpu_memory", lambda: 4 * 2**20)  # 4 MiB free
    assert chunk(512) is not None and 1 <= chunk(512) < 512
    frames = torch.randn(1, 40, 3, 32, 32)
    with torch.no_grad():  # the chunked forward gives the unchunked embedding
        assert_rel("chunked", enc(frames, chunk_frames=chunk(40) or 40), enc(frames), 1e-5)


# ------------------------------------------------------------------------------------------------
# reruns never reuse a stale or cut result, never delete what they did not write, never collide
# ------------------------------------------------------------------------------------------------
def _other_weights(tmp_path):
    torch.manual_seed(1)
    enc = XCLIPVideoEncoder(input_resolution=32, patch_size=16, width=128, layers=1, heads=2, embed_dim=64,
                            num_frames=4, mit_heads=1, backend="torch").eval()
    path = tmp_path / "other.pth"
    torch.save({"model": enc.state_dict()}, path)
    return enc, str(path)


def _expected(enc, video, frames, dtype=torch.float32):
    with VideoReader(str(video)) as reader:
        _, rgb = reader.sample(frames)
    with torch.no_grad():
        return enc.to(dtype)(torch.stack([preprocess(f, 32) for f in rgb])[None].to(dtype))[0].float()


@pytest.mark.parametrize("change", ["frames", "weights", "dtype", "per-frame"])
def test_rerun_with_other_settings_encodes_again(change, dataset, tmp_path, capsys):
    enc, weights = _weights(tmp_path)
    video = dataset / "a" / "one.mp4"
    out = tmp_path / "out"
    assert _encode(video, "--weights", weights, "--trust-weights", "--frames", 4, "--out-dir", out, "--workers", 0) == 0
    capsys.readouterr()
    argv = ["--weights", weights, "--trust-weights", "--frames", 4]
    if change == "frames":
        argv[-1], want = 2, _expected(enc, video, 2)
    elif change == "weights":
        other, argv[1] = _other_weights(tmp_path)
        want = _expected(other, video, 4)
    elif change == "dtype":
        argv += ["--dtype", "float64"]
        want = _expected(enc, video, 4, torch.float64)
    else:
        argv += ["--per-frame"]
        want = _expected(enc, video, 4)
    assert _encode(video, *argv, "--out-dir", out, "--workers", 0) == 0
    captured = capsys.readouterr()
    assert "0 already done" in captured.out
    assert "encoded again: made with other settings" in captured.err
    assert_rel(f"after changing {change}", torch.from_numpy(np.load(out / "one.npy"))[None], want[None], 1e-5)
    rec = _index(out)["one.mp4"]
    if change == "per-frame":
        assert rec["frames_output"] == "one.frames.npy" and np.load(out / "one.frames.npy").shape == (4, 64)
    # and a third run with the same settings reuses it
    assert _encode(video, *argv, "--out-dir", out, "--workers", 0) == 0
    assert "1 already done" in capsys.readouterr().out


def test_rerun_with_other_windows_encodes_again(dataset, tmp_path, capsys):
    _, weights = _weights(tmp_path)
    video = dataset / "a" / "one.mp4"
    out = tmp_path / "out"
    for stride, windows in ((4, 10), (8, 5)):
        assert _encode(video, "--weights", weights, "--trust-weights", "--window", 8, "--stride", stride,
                       "--out-dir", out, "--workers", 0) == 0
        assert np.load(out / "one.npy").shape == (windows, 64) and np.load(out / "one.times.npy").shape == (windows, 2)
        assert len(_index(out)["one.mp4"]["windows"]) == windows
    assert "stride '4' -> '8'" in capsys.readouterr().err


def test_cut_or_missing_outputs_are_encoded_again(dataset, tmp_path, capsys):
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    argv = [dataset / "a" / "one.mp4", dataset / "b" / "two.avi", "--weights", weights, "--trust-weights",
            "--out-dir", out, "--workers", 0]
    assert _encode(*argv) == 0
    good = np.load(out / "one.npy")
    data = (out / "one.npy").read_bytes()
    (out / "one.npy").write_bytes(data[: len(data) - 10])  # cut, still marked ok in the index
    os.remove(out / "b" / "two.npy") if (out / "b").exists() else os.remove(out / "two.npy")
    capsys.readouterr()
    assert _encode(*argv) == 0
    captured = capsys.readouterr()
    assert "0 already done" in captured.out and "missing, incomplete" in captured.err
    assert np.array_equal(np.load(out / "one.npy"), good) and (out / "two.npy").exists()


def test_only_its_own_temporary_files_are_removed(tmp_path):
    _, weights = _weights(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.tmp-0.mp4", n=20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp-v2.txt").write_text("keep me")
    (out / extract.STATE).mkdir()
    (out / extract.STATE / "tmp").mkdir()
    (out / extract.STATE / "tmp" / "rank0-mine.npy").write_text("not named as the run names its files")
    for _ in range(2):
        assert _encode(videos, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0) == 0
        assert (out / "clip.tmp-0.npy").exists(), "the output of clip.tmp-0.mp4 was deleted"
    assert (out / "notes.tmp-v2.txt").read_text() == "keep me"
    assert (out / extract.STATE / "tmp" / "rank0-mine.npy").exists()


def test_every_output_file_is_unique_per_video_and_kind(tmp_path):
    enc, weights = _weights(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, name in enumerate(["x.mp4", "x.frames.mp4", "x.times.mp4", "X.mkv"]):
        write_video(videos / name, n=20 + 5 * i, rate=10)
    out = tmp_path / "out"
    assert _encode(videos, "--weights", weights, "--trust-weights", "--window", 8, "--per-frame", "--out-dir", out,
                   "--workers", 0) == 0
    index = _index(out)
    files = [rec[k] for rec in index.values() for k in ("output", "frames_output", "times_output")]
    assert len(set(f.casefold() for f in files)) == len(files) == 12, files
    for name, rec in index.items():  # each file holds its own video's result
        n = 20 + 5 * ["x.mp4", "x.frames.mp4", "x.times.mp4", "X.mkv"].index(name)
        windows = (n - 8) // 8 + 1  # the stride defaults to the window
        assert np.load(out / rec["output"]).shape == (windows, 64), name
        assert np.load(out / rec["frames_output"]).shape == (windows, 8, 64), name
        assert np.load(out / rec["times_output"]).shape == (windows, 2), name


def test_out_naming_a_folder_is_refused_before_work(dataset, tmp_path, capsys):
    video = dataset / "b" / "two.avi"
    (tmp_path / "emb.npy").mkdir()
    assert _encode(video, "--out", tmp_path / "emb.npy") == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "e_frames.npy").mkdir()
    assert _encode(video, "--out", tmp_path / "e.npy", "--per-frame") == 2
    assert "e_frames.npy is a folder" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.jsonl").mkdir()
    assert _encode(video, "--out-dir", tmp_path / "d") == 2
    assert "index.jsonl exists and is not a file" in capsys.readouterr().err
    (tmp_path / "f").write_text("a file")
    assert _encode(video, "--out-dir", tmp_path / "f") == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--window", "8", "--fps", "-2"], "argument --fps: must be a finite number > 0"),
    (["--window", "8", "--fps", "inf"], "argument --fps: must be a finite number > 0"),
    (["--window", "8", "--fps", "nan"], "argument --fps: must be a finite number > 0"),
    (["--window", "8", "--fps", "0"], "argument --fps: must be a finite number > 0"),
    (["--window", "inf"], "argument --window: expected a number of frames (16) or seconds (4s)"),
    (["--window", "infs"], "argument --window: must be a finite number > 0"),
    (["--window", "8", "--stride", "0"], "argument --stride: must be a finite number > 0"),
    (["--timeout", "0"], "argument --timeout: must be a finite number > 0"),
    (["--timeout", "nan"], "argument --timeout: must be a finite number > 0"),
    (["--device", "meta"], "argument --device: device 'meta' is not supported"),
    (["--device", "bogus"], "argument --device: unknown device 'bogus'"),
])
def test_encode_options_are_validated_before_work(argv, message, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _encode(dataset / "b" / "two.avi", "--out-dir", tmp_path / "o", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fps_without_window_is_an_error(dataset, tmp_path, capsys):
    assert _encode(dataset / "b" / "two.avi", "--fps", 4, "--out-dir", tmp_path / "o") == 2
    assert "--fps sets the frame rate of --window" in capsys.readouterr().err


def _write_vfr(path, n=40):
    """A variable-frame-rate video: 10 frames 33 ms apart, 10 frames 100 ms apart, and so on."""
    from fractions import Fraction

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=30)
    stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
    stream.codec_context.time_base = Fraction(1, 1000)
    stream.codec_context.gop_size = 5
    t = 0
    for i in range(n):
        img = np.zeros((40, 48, 3), np.uint8)
        img[:, :, 0] = (6 * i) % 256
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = t, Fraction(1, 1000)
        t += 33 if (i // 10) % 2 == 0 else 100
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def test_variable_frame_rate_videos_are_sampled_by_position(tmp_path):
    path = _write_vfr(tmp_path / "phone.mp4", n=40)
    with VideoReader(path) as full:
        every = [f.to_ndarray(format="rgb24") for _, f in full._decode_from(None)]
    assert len(every) == 40
    with VideoReader(path) as reader:
        indices, frames = reader.sample(8)
        assert not reader.truncated
    assert indices == [2, 7, 12, 17, 22, 27, 32, 37]
    for i, frame in zip(indices, frames):
        assert np.array_equal(frame, every[i]), f"frame {i}"
    with VideoReader(path) as reader:  # seeking far ahead, by position
        got = reader.frames([39, 33, 5], seek=True)
    for i, frame in zip([39, 33, 5], got):
        assert np.array_equal(frame, every[i]), f"frame {i}"
    _, weights = _weights(tmp_path)
    assert _encode(path, "--weights", weights, "--trust-weights", "--out", tmp_path / "e.npy", "--workers", 0) == 0


def test_a_corrupt_index_is_read_around(dataset, tmp_path, capsys):
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    argv = [dataset / "a" / "one.mp4", "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0]
    assert _encode(*argv) == 0
    with open(out / "index.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"a string"\n{"path": 3}\n\xff\xfe not utf-8\n{"cut by a kill": \n')
    capsys.readouterr()
    assert _encode(*argv) == 0
    captured = capsys.readouterr()
    assert "1 already done" in captured.out and "5 line(s)" in captured.err
    lines = (out / "index.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "ok"


def test_symlinked_folders_are_followed_once(tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    write_video(root / "real" / "a.mp4", n=10)
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_video(other / "b.mp4", n=10)
    os.symlink(other, root / "linked")
    os.symlink(root, root / "real" / "loop")  # a cycle: searched once
    jobs = extract.discover([str(root)])
    assert sorted(os.path.relpath(j.path, root) for j in jobs) == ["linked/b.mp4", "real/a.mp4"]


# ------------------------------------------------------------------------------------------------
# resume knows the video by its file, not by the path as typed; outputs of earlier settings go;
# a cut log line loses nothing; a full disk fails the run
# ------------------------------------------------------------------------------------------------
def test_two_videos_with_one_relative_name_are_two_videos(tmp_path, monkeypatch, capsys):
    """Runs from two working folders name ``clip.mp4``: the second is a new video (not skipped as
    done), written beside the first under a name of its own; each record's output holds its video's
    embedding, and a rerun of either skips it."""
    enc, weights = _weights(tmp_path)
    out = tmp_path / "out"
    for folder, n in (("first", 20), ("second", 30)):
        (tmp_path / folder).mkdir()
        write_video(tmp_path / folder / "clip.mp4", n=n, rate=10 if folder == "first" else 5)
    for folder in ("first", "second"):
        monkeypatch.chdir(tmp_path / folder)
        assert _encode("clip.mp4", "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0) == 0
        assert "0 already done" in capsys.readouterr().out, f"{folder}: skipped as done"
    with open(out / "index.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["source"]["path"] for r in records) == sorted(
        str((tmp_path / f / "clip.mp4").resolve()) for f in ("first", "second"))
    assert len({r["output"] for r in records}) == 2
    for rec in records:
        want = _expected(enc, rec["source"]["path"], 4)
        assert_rel(rec["source"]["path"], torch.from_numpy(np.load(out / rec["output"])), want, 1e-5)
    monkeypatch.chdir(tmp_path / "first")
    assert _encode("clip.mp4", "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0) == 0
    assert "1 already done" in capsys.readouterr().out


def test_a_replaced_video_or_a_reshaped_output_is_encoded_again(tmp_path, capsys):
    enc, weights = _weights(tmp_path)
    video, out = tmp_path / "clip.mp4", tmp_path / "out"
    write_video(video, n=20)
    argv = [video, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0]
    assert _encode(*argv) == 0
    first = np.load(out / "clip.npy")
    write_video(video, n=30, rate=5)  # re-downloaded: other content under the same name
    capsys.readouterr()
    assert _encode(*argv) == 0
    captured = capsys.readouterr()
    assert "0 already done" in captured.out and "the video file changed since" in captured.err
    assert_rel("the new content", torch.from_numpy(np.load(out / "clip.npy")), _expected(enc, video, 4), 1e-5)
    assert (np.load(out / "clip.npy") - first).max() > 1e-4
    np.save(out / "clip.npy", np.zeros((2, 64), np.float32))  # another float array over the output
    assert _encode(*argv) == 0
    captured = capsys.readouterr()
    assert "0 already done" in captured.out and "not of the recorded shape" in captured.err
    assert np.load(out / "clip.npy").shape == (64,)


def test_outputs_of_earlier_settings_are_removed(dataset, tmp_path, capsys):
    """A rerun without --window / --per-frame removes the .times.npy / .frames.npy its video's
    previous record named; files the run did not write stay."""
    _, weights = _weights(tmp_path)
    video, out = dataset / "a" / "one.mp4", tmp_path / "out"
    base = [video, "--weights", weights, "--trust-weights", "--out-dir", out, "--workers", 0]
    assert _encode(*base, "--window", 8, "--per-frame") == 0
    assert (out / "one.times.npy").exists() and (out / "one.frames.npy").exists()
    np.save(out / "one.notes.npy", np.ones(3))  # the user's
    assert _encode(*base, "--per-frame") == 0
    assert not (out / "one.times.npy").exists(), "the times of the windowed run stayed beside the new output"
    assert np.load(out / "one.frames.npy").shape == (4, 64) and np.load(out / "one.npy").shape == (64,)
    assert _encode(*base) == 0
    assert not (out / "one.frames.npy").exists()
    np.save(out / "one.times.npy", np.zeros((1, 2)))  # the user's file under a name the run may use
    assert _encode(*base, "--frames", 2) == 0  # other settings: encoded again, but that file is not ours
    assert (out / "one.times.npy").exists() and (out / "one.notes.npy").exists()
    assert sorted(p.name for p in out.iterdir()) == [".xclip-fast", "index.jsonl", "one.notes.npy", "one.npy",
                                                     "one.times.npy"]


def test_a_cut_log_line_loses_no_record_and_a_full_disk_fails_the_run(dataset, tmp_path, capsys):
    """A file size limit (``ulimit -f``, as a full disk) cuts the per-rank log in the middle of a
    record: the run fails with the cause, and the rerun lists every video, each with its file."""
    pytest.importorskip("resource", reason="file size limits are a POSIX feature")
    _, weights = _weights(tmp_path)
    out = tmp_path / "out"
    argv = [str(dataset), "--weights", weights, "--trust-weights", "--out-dir", str(out), "--workers", "0"]
    assert _encode(dataset / "a" / "one.mp4", *argv[1:]) == 0
    line = len((out / "index.jsonl").read_bytes())  # about one record
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({line * 3 // 2}, {line * 3 // 2}))\n"
            "from xclip_fast.cli import main\n"
            f"sys.exit(main(['encode', '--device', 'cpu', '--dtype', 'float32', '--quiet', *{argv!r}]))")
    shutil.rmtree(out)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: writing the outputs failed" in done.stderr and "Traceback" not in done.stderr, done.stderr
    logs = list((out / extract.STATE).glob("index.rank*.jsonl"))
    assert logs and not logs[0].read_bytes().endswith(b"\n"), "the limit did not cut a record"
    capsys.readouterr()
    assert _encode(*argv) == 0
    index = _index(out)
    assert set(index) == {"one.mp4", "two.avi", "three.mkv"}, index
    assert all(np.load(out / r["output"]).shape == (64,) for r in index.values())
