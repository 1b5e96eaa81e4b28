"""The extraction stages alone, without a decoder or an encoder: discover -> resume -> store.

``tests/test_extract.py`` runs the whole ``encode`` command on real videos; here each stage is
called by itself on placeholder files (discovery and resume decisions never open a video), so
that a change in one stage fails here, named, before it fails end to end."""

import json
import os

import numpy as np
import pytest

from xclip_fast.extract import jobs, resume, store

SETTINGS = {"frames": 8, "weights": "abc", "dtype": "float32"}


def _files(job):
    return store.files_for(job, per_frame=True, windows=False)


def _complete(out_dir, job, source, settings=SETTINGS):
    """What the encode stage leaves for one video: its files and its record."""
    rec = dict(path=job.path, output=job.name, status="ok", source=source, settings=settings,
               settings_id=resume.settings_id(settings))
    store.write_outputs(out_dir, _files(job), np.ones(4, np.float32), np.ones((8, 4), np.float32), rec, rank=0)
    store.append_record(out_dir, 0, rec)
    return rec


@pytest.fixture
def videos(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("b.mp4", "a.mkv", "sub/c.avi", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"placeholder")
    return tmp_path


def test_discover_orders_folders_and_names_outputs(videos):
    found = jobs.discover([str(videos / "in")])
    assert [os.path.basename(j.path) for j in found] == ["a.mkv", "b.mp4", "c.avi"]  # sorted by relative path
    assert [j.name for j in found] == ["a.npy", "b.npy", os.path.join("sub", "c.npy")]
    assert [j.index for j in found] == [0, 1, 2] and not any(j.error for j in found)
    missing = jobs.discover([str(videos / "nope.mp4")])
    assert missing[0].error  # fails as a job, with its reason


def test_resume_plans_from_the_index_alone(videos):
    out = str(videos / "out")
    found = jobs.discover([str(videos / "in")])
    todo, previous, skipped = resume.plan(found, out, SETTINGS, _files)
    assert (len(todo), skipped) == (3, 0) and all(previous[j.index] == (jobs.source_of(j.path), None) for j in todo)
    for job in found[:2]:
        _complete(out, job, jobs.source_of(job.path))
    store.merge_index(out, world=1)
    todo, previous, skipped = resume.plan(found, out, SETTINGS, _files)
    assert [j.index for j in todo] == [2] and skipped == 2  # only the video never encoded


@pytest.mark.parametrize("change, why", [
    ("settings", "made with other settings (frames 8 -> 16)"),
    ("video", "the video file changed since"),
    ("output", "output file is missing, incomplete or not of the recorded shape"),
    ("names", "frames output is not"),
])
def test_resume_says_why_a_done_video_runs_again(change, why, videos, capsys):
    out = str(videos / "out")
    job = jobs.discover([str(videos / "in" / "b.mp4")])[0]
    rec = _complete(out, job, jobs.source_of(job.path))
    settings, files_of = SETTINGS, _files
    if change == "settings":
        settings = dict(SETTINGS, frames=16)
    elif change == "video":
        with open(job.path, "ab") as f:
            f.write(b"more")
    elif change == "output":
        with open(os.path.join(out, rec["output"]), "r+b") as f:
            f.truncate(20)  # a cut .npy
    else:
        def files_of(j):
            return dict(_files(j), frames_output="elsewhere.npy")
    todo, previous, _ = resume.plan([job], out, settings, files_of)
    assert [j.index for j in todo] == [0] and previous[0][1]["output"] == rec["output"]
    assert why in capsys.readouterr().err


def test_store_removes_only_what_the_previous_record_named(videos):
    out = str(videos / "out")
    job = jobs.discover([str(videos / "in" / "b.mp4")])[0]
    previous = _complete(out, job, jobs.source_of(job.path))
    stranger = os.path.join(out, "b.times.npy")  # never named by a record of b: not ours to remove
    np.save(stranger, np.zeros(2))
    now = dict(previous, frames_output=None)  # this run writes no per-frame output
    store.remove_unnamed(out, job, previous, now)
    assert not os.path.exists(os.path.join(out, "b.frames.npy"))
    assert os.path.exists(os.path.join(out, "b.npy")) and os.path.exists(stranger)


def test_merge_keeps_the_latest_record_of_each_video(videos):
    out = str(videos / "out")
    job = jobs.discover([str(videos / "in" / "b.mp4")])[0]
    source = jobs.source_of(job.path)
    _complete(out, job, source, dict(SETTINGS, frames=4))
    _complete(out, job, source)
    merged = store.merge_index(out, world=1)
    with open(os.path.join(out, store.INDEX)) as f:
        lines = [json.loads(line) for line in f]
    assert lines == merged and len(lines) == 1 and lines[0]["settings"]["frames"] == 8
    assert not [f for f in os.listdir(store.state_dir(out)) if f.startswith("index.rank")]  # logs merged away


def _run(found, out):
    """One run's resume and store stages on placeholder files: the prepared jobs, those encoded."""
    prepared = resume.prepare(found, out)
    todo, _, _ = resume.plan(prepared, out, SETTINGS, _files)
    for job in todo:
        _complete(out, job, jobs.source_of(job.path))
    store.merge_index(out, world=1)
    return prepared, todo


def _outputs(out) -> set:
    """The embedding files in ``out`` (not the per-frame ones every placeholder result has)."""
    return {os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs if f.endswith(".npy")
            and not f.endswith(".frames.npy") and ".xclip-fast" not in r}


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_one_video_through_links_is_one_video(videos, capsys):
    """``a.mp4`` and two links to it, in a folder or as files: encoded once (one record, one output),
    under the first input; the same command again encodes nothing."""
    folder = videos / "links"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"placeholder")
    for link in ("b.mp4", "c.mp4"):
        os.symlink(folder / "a.mp4", folder / link)
    out = str(videos / "out")
    for inputs in ([str(folder)], [str(folder / n) for n in ("c.mp4", "a.mp4", "b.mp4")]):
        found = jobs.discover(inputs)
        assert len(found) == 3
        prepared, todo = _run(found, out)
        assert len(prepared) == 1 and "2 input(s) are a video given earlier" in capsys.readouterr().err
        assert _outputs(out) == {"a.npy"} and len(store.read_index(out)) == 1
        assert _run(found, out)[1] == []  # again: nothing to encode
    assert store.read_index(out)[os.path.realpath(folder / "a.mp4")]["path"] == str(folder / "a.mp4")


def test_names_stay_when_videos_sharing_a_name_come_in_another_order(videos):
    """``a/x.mp4`` and ``b/x.mp4`` given as (a, b), then (b, a) twice: each video keeps the name it
    got first, nothing is encoded again, and every output file is named by a record."""
    for sub in ("a", "b"):
        (videos / sub).mkdir()
        (videos / sub / "x.mp4").write_bytes(sub.encode())
    out = str(videos / "out")
    a, b = str(videos / "a" / "x.mp4"), str(videos / "b" / "x.mp4")
    prepared, todo = _run(jobs.discover([a, b]), out)
    names = {j.path: j.name for j in prepared}
    assert len(todo) == 2 and names[a] == "x.npy" and names[b].startswith("x-")
    for _ in range(2):
        prepared, todo = _run(jobs.discover([b, a]), out)
        assert todo == [] and {j.path: j.name for j in prepared} == names
    records = store.read_index(out)
    assert _outputs(out) == {r["output"] for r in records.values()} == set(names.values())


def test_a_video_keeps_its_name_when_reached_another_way(videos):
    """Encoded as a file (``b.npy``), then through its folder, a list or a link: its record's name
    is kept and its outputs reused; a new video that would take a held name gets its own."""
    out = str(videos / "out")
    first = jobs.discover([str(videos / "in" / "b.mp4")])
    _run(first, out)
    (videos / "in" / "sub" / "b.mp4").write_bytes(b"another video")  # would be sub/b.npy: no clash
    prepared, todo = _run(jobs.discover([str(videos / "in")]), out)
    assert {os.path.basename(j.path) + ":" + j.name for j in todo} == {
        "a.mkv:a.npy", "c.avi:" + os.path.join("sub", "c.npy"), "b.mp4:" + os.path.join("sub", "b.npy")}
    assert len(prepared) == 4 and "b.npy" in {j.name for j in prepared}
    (videos / "flat").mkdir()
    (videos / "flat" / "a.mkv").write_bytes(b"a third")  # a.npy is held by in/a.mkv
    prepared, todo = _run(jobs.discover([str(videos / "flat" / "a.mkv"), str(videos / "in")]), out)
    assert [j.name for j in todo] == [f"a-{jobs.tag(os.path.realpath(videos / 'flat' / 'a.mkv'))}.npy"]
