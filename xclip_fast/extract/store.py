"""Write and index: a video's outputs through temporary files renamed into place, the index
(``index.jsonl``, per-rank logs while a run goes on), the run's own folder inside ``--out-dir`` and
its lock (one run at a time writes into a folder). Only files this package names are ever written
or removed there."""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import socket
import sys
import uuid

import numpy as np

from xclip_fast.extract.jobs import Job, video_key

INDEX = "index.jsonl"
STATE = ".xclip-fast"  # the run's own folder inside --out-dir: per-rank logs, temporary files and the lock
LOCK = "lock"  # in STATE: locked by the run writing into --out-dir, and naming it
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


class OutDirBusy(RuntimeError):
    """Another run holds the lock of the ``--out-dir`` (see :func:`lock_out_dir`)."""


def lock_out_dir(out_dir: str):
    """Take the lock of ``out_dir`` for this run: an open file (``<out-dir>/.xclip-fast/lock``) with an
    exclusive ``flock`` on it, which this process holds until the file is closed or the process ends
    (a killed run leaves no lock behind). Two runs writing into one folder at once would mix their
    outputs (each merges and removes the per-rank logs, removes the other's temporary files and may
    give one output name to two videos), so a second run gets :class:`OutDirBusy`, naming the
    process that holds it. The file then names this process (pid, host, start, command). Returns the
    file, to close when the run is done; None where the file system has no locks (a note is printed:
    nothing then stops a second run)."""
    os.makedirs(state_dir(out_dir), exist_ok=True)
    path = os.path.join(state_dir(out_dir), LOCK)
    f = open(path, "a+", encoding="utf-8")  # (not truncated before the lock is taken: it names the holder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        fcntl = None
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no fcntl module")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _holder(f.read())
        f.close()
        raise OutDirBusy(
            f"--out-dir {out_dir} is in use by another xclip-fast encode run ({holder}); two runs into one folder "
            "would mix their outputs. Wait for it to end, or give another --out-dir. The lock ends with that "
            "process; if it no longer runs (a run on another machine sharing this folder, cut off where the file "
            f"system keeps its locks), remove {path} and rerun") from None
    except OSError as exc:
        f.close()
        print(f"note: --out-dir {out_dir}: cannot lock {path} ({exc.strerror or exc}): nothing stops another run "
              "from writing into this folder at once, which would mix their outputs", file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), command=" ".join(sys.argv),
                            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))) + "\n")
    f.flush()
    return f


def _holder(text: str) -> str:
    """Who holds a lock, from what the lock file says (it may be empty: taken, not yet written)."""
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
                if isinstance(info, dict) else "a process that did not say which")
    except (ValueError, KeyError):
        return "a process that has not said which yet"


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


def is_output_name(name) -> bool:
    """Whether ``name`` (from a record) is an output name this package could give: a relative
    ``.npy`` path inside ``--out-dir``, normalised (no ``..``)."""
    return (isinstance(name, str) and name.endswith(".npy") and not os.path.isabs(name)
            and os.path.normpath(name) == name and name.split(os.sep)[0] != os.pardir)


def remove_unnamed(out_dir: str, job: Job, previous: dict, rec: dict) -> None:
    """Remove the outputs of this video's previous record that ``rec`` no longer names (written
    by an earlier run with other settings, or left by a result that failed now): nothing else
    would say what they are. Only files named by that record and by this video's own output
    names are removed (before the new record is written: a kill in between leaves a record
    whose files are missing, which the next run encodes again). A video keeps its output name
    from run to run (:func:`xclip_fast.extract.resume.prepare`), so these are all it wrote."""
    for kind, name in own_files(job).items():
        path = os.path.join(out_dir, name)
        if previous.get(kind) == name and rec.get(kind) != name and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


def append_record(out_dir: str, rank: int, rec: dict) -> None:
    """One record appended to this rank's log in the run's own folder (merged by :func:`merge_index`)."""
    os.makedirs(state_dir(out_dir), exist_ok=True)
    append_line(os.path.join(state_dir(out_dir), f"index.rank{rank}.jsonl"), json.dumps(rec))
