"""Write and index: a video's outputs through temporary files renamed into place, the index
(``index.jsonl``, per-rank logs while a run goes on) and the run's own folder inside ``--out-dir``.
Only files this package names are ever written or removed there."""

from __future__ import annotations

import json
import os
import re
import uuid

import numpy as np

from xclip_fast.extract.jobs import Job, video_key

INDEX = "index.jsonl"
STATE = ".xclip-fast"  # the run's own folder inside --out-dir: per-rank logs and temporary files, nothing else
DONE = ("ok", "truncated")  # statuses whose outputs are complete
_TMP = re.compile(r"rank(\d+)-[0-9a-f]{32}\.(npy|jsonl)")  # exactly the temporary files this package writes
_RANK_LOG = re.compile(r"index\.rank(\d+)\.jsonl")


def atomic_save(path: str, array: np.ndarray, tmp_dir: str | None = None, rank: int = 0) -> str:
    """``array`` to ``path`` through a temporary file renamed at the end: a kill never leaves a half
    ``.npy`` under the final name. The temporary file is ``rank<r>-<random>.npy`` in ``tmp_dir`` (the
    run's own folder, see :func:`remove_leftovers`), or ``<path>.xclip-fast-tmp-<random>.npy`` beside
    ``path`` when no folder is given. Returns ``path``."""
    if tmp_dir is None:
        tmp = f"{path}.xclip-fast-tmp-{uuid.uuid4().hex}.npy"
    else:
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, f"rank{rank}-{uuid.uuid4().hex}.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def state_dir(out_dir: str) -> str:
    """The run's own folder inside ``out_dir``: per-rank index logs and ``tmp/``."""
    return os.path.join(out_dir, STATE)


def tmp_dir(out_dir: str) -> str:
    """Where temporary files are written before they are renamed into place."""
    return os.path.join(out_dir, STATE, "tmp")


def remove_leftovers(out_dir: str, rank: int, world: int) -> None:
    """Temporary files of an interrupted run: this rank's, and rank 0 also those of ranks >= world.
    Only files in the run's own folder (``<out-dir>/.xclip-fast/tmp``) named exactly as
    :func:`atomic_save` names them are ever removed; nothing else under ``--out-dir`` is touched."""
    folder = tmp_dir(out_dir)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        match = _TMP.fullmatch(name)
        path = os.path.join(folder, name)
        if match is None or not os.path.isfile(path) or os.path.islink(path):
            continue
        owner = int(match.group(1))
        if owner == rank or (rank == 0 and owner >= world):
            os.remove(path)


def _rank_logs(out_dir: str) -> list[str]:
    folder = state_dir(out_dir)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if _RANK_LOG.fullmatch(f)]


def _is_record(rec) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("path"), str) and isinstance(rec.get("output"), str) \
        and isinstance(rec.get("status"), str)


def record_key(rec: dict) -> str:
    """The video a record is about: the resolved path of its ``source``; records of older versions
    have none, and their path is resolved from the working folder."""
    source = rec.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        return source["path"]
    return video_key(rec["path"])


def append_line(path: str, line: str) -> None:
    """Append one line to a log, on a line of its own even when the log ends in a line cut by a
    failed write (a full disk, a kill): the cut line stays unreadable, this one stays whole. The
    write is flushed and synced; an error (no space left) is raised, never hidden."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_index(out_dir: str, problems: list | None = None) -> dict:
    """The last record of each video (by :func:`record_key`) in ``index.jsonl`` and the per-rank
    logs left by an interrupted run (records are appended, so later ones win). Lines that are not
    records (cut by a kill or a full disk, edited, not UTF-8) are skipped and counted in ``problems``."""
    records, bad = {}, 0
    for path in [os.path.join(out_dir, INDEX)] + _rank_logs(out_dir):
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError is a ValueError
                    rec = None
                if not _is_record(rec):
                    bad += 1
                    continue
                records[record_key(rec)] = rec
    if bad and problems is not None:
        problems.append(f"{bad} line(s) of {os.path.join(out_dir, INDEX)} (or its per-rank logs) are not index records "
                        "and were ignored")
    return records


def check_out_dir(out_dir: str) -> str | None:
    """What stops ``--out-dir`` from holding a run's outputs (None when it can): checked before work."""
    for name, kind in ((INDEX, "a file"), (STATE, "a folder")):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not (os.path.isfile(path) if kind == "a file" else os.path.isdir(path)):
            return f"--out-dir {out_dir}: {path} exists and is not {kind} (the run writes it)"
    return None


def is_whole(path: str, shape) -> bool:
    """``path`` is a complete ``.npy`` file (its header and all its data are there) holding a float
    array of exactly ``shape``."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.dtype.kind == "f" and list(arr.shape) == list(shape)


def merge_index(out_dir: str, world: int) -> list[dict]:
    """Rank 0 at the end: every rank's records and the earlier index in one ``index.jsonl`` (one line
    per video, the latest record of each), written atomically; the per-rank logs are removed."""
    records = read_index(out_dir)
    folder = tmp_dir(out_dir)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"rank0-{uuid.uuid4().hex}.jsonl")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records.values():
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, os.path.join(out_dir, INDEX))
    for path in _rank_logs(out_dir):
        os.remove(path)
    return list(records.values())



def own_files(job: Job) -> dict:
    """Every file a result of ``job`` may have, by kind (relative to ``--out-dir``), whatever the
    settings: ``<stem>.npy``, ``<stem>.frames.npy``, ``<stem>.times.npy``."""
    stem = job.name[:-4]
    return {"output": job.name, "frames_output": stem + ".frames.npy", "times_output": stem + ".times.npy"}


def files_for(job: Job, per_frame: bool, windows: bool) -> dict:
    """The files of one video's result with a run's settings, by kind (relative to ``--out-dir``)."""
    return {kind: name for kind, name in own_files(job).items()
            if kind == "output" or (kind == "frames_output" and per_frame) or (kind == "times_output" and windows)}


def write_outputs(out_dir: str, files: dict, embeds, per_frame, rec: dict, rank: int) -> None:
    """A video's ``files`` (see :func:`files_for`), each through a temporary file of the run's own
    folder; the record ``rec`` then names every one of them and their shapes."""
    tmp = tmp_dir(out_dir)
    os.makedirs(os.path.dirname(os.path.join(out_dir, files["output"])), exist_ok=True)
    if "times_output" in files:
        atomic_save(os.path.join(out_dir, files["times_output"]),
                    np.asarray(rec["windows"], dtype=np.float64).reshape(-1, 2), tmp, rank)
    if "frames_output" in files:
        atomic_save(os.path.join(out_dir, files["frames_output"]), per_frame, tmp, rank)
    # last: it (with the index line) marks the video complete
    atomic_save(os.path.join(out_dir, files["output"]), embeds, tmp, rank)
    rec.update(files)
    shapes = {"output": embeds.shape, "frames_output": per_frame.shape,
              "times_output": (len(rec.get("windows", ())), 2)}
    rec["shapes"] = {kind: list(shapes[kind]) for kind in files}


def remove_unnamed(out_dir: str, job: Job, previous: dict, rec: dict) -> None:
    """Remove the outputs of this video's previous record that ``rec`` no longer names (written
    by an earlier run with other settings, or left by a result that failed now): nothing else
    would say what they are. Only files named by that record and by this video's own output
    names are removed (before the new record is written: a kill in between leaves a record
    whose files are missing, which the next run encodes again)."""
    for kind, name in own_files(job).items():
        path = os.path.join(out_dir, name)
        if previous.get(kind) == name and rec.get(kind) != name and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


def append_record(out_dir: str, rank: int, rec: dict) -> None:
    """One record appended to this rank's log in the run's own folder (merged by :func:`merge_index`)."""
    os.makedirs(state_dir(out_dir), exist_ok=True)
    append_line(os.path.join(state_dir(out_dir), f"index.rank{rank}.jsonl"), json.dumps(rec))
