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
