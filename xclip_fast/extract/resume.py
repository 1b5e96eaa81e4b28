"""Resume decisions: which jobs a rerun into the same ``--out-dir`` skips, and why the others are
encoded again (other settings or weights, a changed file, missing or cut outputs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import torch

from xclip_fast.extract.jobs import Job, source_of, tag, video_key
from xclip_fast.extract.store import DONE, is_output_name, is_whole, read_index


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every parameter and buffer of ``module`` (names, dtypes, shapes, values): the
    identity of the weights a result was made with, whatever file or hub name they came from."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settings_id(settings: dict) -> str:
    """A short digest of the settings that decide a result (sorted JSON)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]



def prepare(jobs: list[Job], out_dir: str, announce: bool = True) -> list[Job]:
    """The jobs of a run into ``out_dir``, one per video and with stable output names, before they
    are shared out: a video given again (the same file through a link, or the same path twice) is
    encoded once, under the first input (a note says how many were dropped when ``announce``); a
    video keeps the output name its complete record in the index gives it (however it is reached
    now: a file, a folder, a list, a link), else takes the first of its own name and the names its
    inputs may take (``Job.names``) that no other video holds (in the index or earlier in this run).
    So running the same command again gives every video the name it had, whatever other videos
    share its file name, and reuses its outputs."""
    done = read_index(out_dir)
    held = {rec["output"].casefold(): key for key, rec in done.items() if rec.get("status") in DONE}
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(video_key(job.path), []).append(job)
    out = []
    for key, group in groups.items():
        job = group[0]
        names = [n for g in group for n in (g.names or (g.name,))]
        rec = done.get(key)
        previous = [rec["output"]] if rec is not None and rec.get("status") in DONE and is_output_name(rec["output"]) \
            else []
        for name in previous + [job.name] + names:
            if held.get(name.casefold(), key) == key:
                break
        else:  # (every name it may take is another video's: the hash of its own path is its own)
            name = f"{job.name[:-4]}-{tag(key)}.npy"
        held[name.casefold()] = key
        out.append(job if name == job.name else dataclasses.replace(job, name=name))
    dropped = len(jobs) - len(out)
    if dropped and announce:
        print(f"note: {dropped} input(s) are a video given earlier (the same file through a link, or the same path "
              "again): each video is encoded once, under its first input", file=sys.stderr)
    return sorted(out, key=lambda j: j.index)


def stale(rec: dict, source: dict | None, settings: dict, files: dict, out_dir: str) -> str | None:
    """Why the complete record ``rec`` of a video cannot be reused by a run with ``settings`` that
    would write ``files`` (None when it can); ``source``: the video file now (:func:`source_of`)."""
    if rec.get("settings_id") != settings_id(settings):
        old = rec.get("settings") if isinstance(rec.get("settings"), dict) else None
        if old is None:
            return "their records do not say which settings made them"
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        return "made with other settings (" + ", ".join(changed or ["settings differ"]) + ")"
    old = rec.get("source")
    if not isinstance(old, dict) or "size" not in old or "mtime_ns" not in old:
        return "their records do not identify the video file (size, modification time)"
    if source is None or (old["size"], old["mtime_ns"]) != (source["size"], source["mtime_ns"]):
        return "the video file changed since (size or modification time)"
    shapes = rec.get("shapes") if isinstance(rec.get("shapes"), dict) else {}
    for kind, name in files.items():
        if rec.get(kind) != name:
            return f"their {kind.replace('_', ' ')} is not {name} (output names changed)"
        if not isinstance(shapes.get(kind), list):
            return "their records do not give the shapes of their outputs"
        if not is_whole(os.path.join(out_dir, name), shapes[kind]):
            return f"their {kind.replace('_', ' ')} file is missing, incomplete or not of the recorded shape"
    return None


def plan(jobs: list[Job], out_dir: str | None, settings: dict, files_of) -> tuple[list[Job], dict, int]:
    """The jobs to encode of ``jobs`` (with ``out_dir``, those whose complete result is not there:
    same settings, same file, whole outputs), each job's (source, previous record or None) by its
    index, and how many were skipped. A job whose output name an earlier run gave another video
    gets a short hash in its name. The reasons for encoding done videos again are printed.
    ``files_of(job)``: the files this run writes for a job (:func:`xclip_fast.extract.store.files_for`)."""
    problems, redo, todo, previous, skipped = [], {}, [], {}, 0
    done = read_index(out_dir, problems) if out_dir else {}
    owners = {rec["output"].casefold(): key for key, rec in done.items() if rec.get("status") in DONE}
    for job in jobs:
        source = source_of(job.path) if out_dir and not job.error else None
        key = video_key(job.path, source)
        if owners.get(job.name.casefold(), key) != key:  # another video's output (an earlier run's) has this name
            job = dataclasses.replace(job, name=f"{job.name[:-4]}-{tag(key)}.npy")
        rec = done.get(key)
        why = stale(rec, source, settings, files_of(job), out_dir) if rec is not None and rec.get("status") in DONE \
            else "new"
        if why is None:
            skipped += 1
            continue
        previous[job.index] = (source, rec)
        if why != "new":
            redo[why] = redo.get(why, 0) + 1
        todo.append(job)
    for line in problems + [f"{n} video(s) done before are encoded again: {why}" for why, n in redo.items()]:
        print(f"note: {line}", file=sys.stderr)
    return todo, previous, skipped
