"""Discover: the jobs of a run (files, folders, list files) in a stable order, their output names,
and what identifies a video (its resolved path, size and modification time)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

from xclip_fast.video import VIDEO_EXTENSIONS, VideoError, check_regular_file

KINDS = (".frames", ".times")  # the suffixes of a video's other outputs (<stem>.frames.npy, <stem>.times.npy)


@dataclass(frozen=True)
class Job:
    """One input video: its position in the whole list, its path, its output name (``.npy``), an
    error found before any decoding (e.g. a missing file or a stream address), and the output names
    it may take, in order of preference (its own name, then with a short hash of its path; see
    :func:`xclip_fast.extract.resume.prepare`)."""

    index: int
    path: str
    name: str
    error: str = ""
    names: tuple = ()


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def _walk(folder: str) -> list[str]:
    """Video files under ``folder``, following symlinked folders (each real folder once)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back to a folder already searched (a cycle): not again
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.join(root, f) for f in files if _is_video(f)]
    return found


def read_list(list_file: str) -> list[str]:
    """The paths of a list file: every line that is not blank, surrounding whitespace removed,
    relative paths taken relative to the list's folder. There is no comment syntax (a video may be
    called ``#take1.mp4``): the jobs, and the rows of ``--out``, follow the non-blank lines."""
    base = os.path.dirname(os.path.abspath(list_file))
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--list {list_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"--list {list_file}: cannot read it ({exc.strerror or exc})") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line:
            paths.append(line if os.path.isabs(line) or "://" in line else os.path.join(base, line))
    return paths


def discover(inputs: list[str], list_file: str | None = None) -> list[Job]:
    """The jobs of a run, in a stable order: the inputs in the order given (a list file's non-blank
    lines in their order), each folder's videos sorted by relative path (symlinked folders
    followed); a video given twice is a job twice (rows of ``--out`` follow the inputs). Output
    names: the path relative to its folder, or the file name, with ``.npy`` for the video suffix.
    Every output file is unique per video and kind: two different videos with one name (compared
    without case, for case-insensitive file systems), and a name ending in ``.frames`` or ``.times``
    (which another video's per-frame or times output would take), get a short hash of the full
    path. Missing paths and non-files become jobs that fail with their reason."""
    entries: list[tuple[str, str]] = []  # (path, output name before the suffix)
    paths = list(inputs) + (read_list(list_file) if list_file is not None else [])
    for path in paths:
        if os.path.isdir(path):
            for video in sorted(_walk(path), key=lambda p: os.path.relpath(p, path)):
                entries.append((video, os.path.splitext(os.path.relpath(video, path))[0]))
        else:
            entries.append((path, os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "video"))
    jobs, names = [], {}
    for path, name in entries:
        key = video_key(path)  # (one file through two links: one video)
        short = tag(key)
        if name.lower().endswith(KINDS):  # x.frames.mp4 would write x.frames.npy, x.mp4's per-frame output
            name = f"{name}-{short}"
        candidates = (name + ".npy", f"{name}-{short}.npy") if not name.endswith(short) else (name + ".npy",)
        if names.get(name.casefold(), key) != key:  # two different videos with one name: tell them apart
            name = f"{name}-{short}"
        names[name.casefold()] = key
        error = ""
        try:
            check_regular_file(path)
        except VideoError as exc:
            error = str(exc)
        jobs.append(Job(len(jobs), path, name + ".npy", error, candidates))
    return jobs


def parse_span(text: str) -> tuple[float, str]:
    """``"16"`` -> (16, "frames"); ``"4s"`` -> (4.0, "seconds")."""
    text = str(text).strip()
    try:
        if text.endswith("s"):
            value, unit = float(text[:-1]), "seconds"
        else:
            value, unit = int(text), "frames"
    except ValueError:
        raise ValueError(f"expected a number of frames (16) or seconds (4s), got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a finite number > 0, got {text!r}")
    return value, unit


def span_frames(span: tuple[float, str] | None, rate: float) -> int | None:
    """A window or stride (see :func:`parse_span`) in frames at ``rate`` frames per second."""
    if span is None:
        return None
    value, unit = span
    return int(value) if unit == "frames" else max(1, int(round(value * rate)))


def source_of(path: str) -> dict | None:
    """What identifies a local video file in the index: its resolved path (symlinks followed, so
    the same file reached from another working folder or through a link is the same video, and
    two files with one relative name are two), its size and its modification time (ns); None when
    it cannot be read (the job then fails with the reason)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def video_key(path: str, source: dict | None = None) -> str:
    """The video a path is about: the resolved path (``source["path"]`` when known); a stream
    address as given."""
    if source is not None:
        return source["path"]
    return path if "://" in path else os.path.realpath(path)


def tag(key: str) -> str:
    """A short hash of a video's key, which tells apart two videos that would share an output name."""
    return hashlib.sha1(key.encode()).hexdigest()[:8]

