"""Feature extraction at dataset scale: ``xclip-fast encode`` on folders, lists, many GPUs.

- Inputs: files, folders (recursive, by video extension) and list files, in a stable order.
- Decoding runs in ``DataLoader`` worker processes while the encoder runs; each video is opened
  once and its sampled frames are reached by seeking (:class:`xclip_fast.video.VideoReader`).
- Two modes: one embedding per video (the official test-mode sampling of T frames), or sliding
  windows (``window`` frames every ``stride`` frames, at the video's rate or a chosen ``fps``), one
  embedding per window with its start and end time.
- Outputs survive interruption: one ``.npy`` per video, written to a temporary file in the run's
  own folder (``<out-dir>/.xclip-fast/``) and renamed into place, and an index (``index.jsonl``)
  that a rerun reads to skip what is complete. Records identify the video by its resolved path,
  size and modification time (:func:`source_of`), not by the path as typed; a video is skipped
  only when its record was made with the same settings and weights (``settings_id``), from the
  same file unchanged, and its files are whole with the shapes the record gives. When a video is
  encoded again, the outputs of its previous record that the new one no longer names (a
  ``.times.npy`` of an earlier ``--window`` run, a ``.frames.npy`` of an earlier ``--per-frame``
  run) are removed, and only those: files the run did not write are never touched.
- Failures are recorded and the run goes on; truncated videos are encoded from their readable
  frames with a warning.
- Under ``torchrun``, rank r takes videos r, r + K, r + 2K, ... of the list; rank 0 shows the
  progress bar and merges the index at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from xclip_fast.video import VIDEO_EXTENSIONS, VideoError, VideoReader, check_regular_file, preprocess

__all__ = ["Job", "discover", "parse_span", "ClipSource", "Extractor", "atomic_save", "merge_index", "INDEX",
           "STATE", "settings_id", "weights_digest", "check_out_dir"]

INDEX = "index.jsonl"
STATE = ".xclip-fast"  # the run's own folder inside --out-dir: per-rank logs and temporary files, nothing else
DONE = ("ok", "truncated")  # statuses whose outputs are complete
KINDS = (".frames", ".times")  # the suffixes of a video's other outputs (<stem>.frames.npy, <stem>.times.npy)
_TMP = re.compile(r"rank(\d+)-[0-9a-f]{32}\.(npy|jsonl)")  # exactly the temporary files this module writes
_RANK_LOG = re.compile(r"index\.rank(\d+)\.jsonl")


@dataclass(frozen=True)
class Job:
    """One input video: its position in the whole list, its path, its output name (``.npy``), and an
    error found before any decoding (e.g. a missing file or a stream address)."""

    index: int
    path: str
    name: str
    error: str = ""


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
        tag = _tag(key)
        if name.lower().endswith(KINDS):  # x.frames.mp4 would write x.frames.npy, x.mp4's per-frame output
            name = f"{name}-{tag}"
        if names.get(name.casefold(), key) != key:  # two different videos with one name: tell them apart
            name = f"{name}-{tag}"
        names[name.casefold()] = key
        error = ""
        try:
            check_regular_file(path)
        except VideoError as exc:
            error = str(exc)
        jobs.append(Job(len(jobs), path, name + ".npy", error))
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


def _frames(span: tuple[float, str] | None, rate: float) -> int | None:
    if span is None:
        return None
    value, unit = span
    return int(value) if unit == "frames" else max(1, int(round(value * rate)))


class ClipSource(torch.utils.data.IterableDataset):
    """Decodes the jobs (split among DataLoader workers) and yields messages, in order per video:
    ``("clip", job, i, frames (T, 3, S, S) float32, start s, end s)`` for each clip or window, then
    ``("done", job, meta)`` with status, error, warnings, frame counts, fps, duration, decode seconds."""

    def __init__(self, jobs, frames: int, size: int, window=None, stride=None, fps: float | None = None,
                 timeout: float = 10.0):
        self.jobs, self.frames, self.size = list(jobs), frames, size
        self.window, self.stride, self.fps, self.timeout = window, stride, fps, timeout

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for job in jobs:
            yield from self._video(job)

    def _video(self, job: Job):
        t0 = time.perf_counter()
        meta = dict(status="ok", error="", warnings=[], frames_decoded=0, frames_announced=None, fps=None,
                    duration=None)
        try:
            if job.error:
                raise VideoError(job.error)
            with VideoReader(job.path, timeout=self.timeout) as reader:
                meta.update(reader.info())
                if meta["frames_announced"] < 1:
                    raise VideoError("the video has no frames")
                if self.window is None:
                    indices, rgb = reader.sample(self.frames)
                    meta["sampled"] = indices
                    yield ("clip", job.index, 0, self._tensor(rgb), 0.0, meta["duration"])
                else:
                    rate = self.fps or reader.fps
                    window, stride = _frames(self.window, rate), _frames(self.stride, rate) or _frames(self.window,
                                                                                                       rate)
                    for i, (start, end, rgb) in enumerate(reader.windows(window, stride, self.fps)):
                        yield ("clip", job.index, i, self._tensor(rgb), start, end)
                if reader.truncated:
                    meta["status"] = "truncated"
                    meta["warnings"].append(f"decoded {reader.readable_frames()} of {meta['frames_announced']} "
                                            "announced frames: encoded from the readable part")
                meta["frames_decoded"] = reader.decoded
        except VideoError as exc:
            meta.update(status="failed", error=str(exc))
        except Exception as exc:  # a decoder failure must not stop the other videos
            meta.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        meta["decode_s"] = time.perf_counter() - t0
        yield ("done", job.index, meta)

    def _tensor(self, rgb) -> torch.Tensor:
        return torch.stack([preprocess(f, self.size) for f in rgb])


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


def record_key(rec: dict) -> str:
    """The video a record is about: the resolved path of its ``source``; records of older versions
    have none, and their path is resolved from the working folder."""
    source = rec.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        return source["path"]
    return video_key(rec["path"])


def _tag(key: str) -> str:
    """A short hash of a video's key, which tells apart two videos that would share an output name."""
    return hashlib.sha1(key.encode()).hexdigest()[:8]


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


def _whole(path: str, shape) -> bool:
    """``path`` is a complete ``.npy`` file (its header and all its data are there) holding a float
    array of exactly ``shape``."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.dtype.kind == "f" and list(arr.shape) == list(shape)


@dataclass
class Extractor:
    """Runs one rank's share of the jobs: decode in workers, encode here, write outputs and index."""

    encoder: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    frames: int
    size: int
    out_dir: str | None = None
    window: tuple | None = None
    stride: tuple | None = None
    fps: float | None = None
    chunk_frames: int | None = None
    batch: int = 1
    workers: int = 0
    per_frame: bool = False
    timeout: float = 10.0
    rank: int = 0
    world: int = 1
    progress: bool = True
    # what decides a result (frames, window, stride, fps, per-frame, weights digest, dtype, ...): a
    # rerun into the same --out-dir reuses a video's outputs only when its record has the same
    settings: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # job index -> (embedding, per-frame) for --out
    _previous: dict = field(default_factory=dict, repr=False)  # job index -> (its source, its last record or None)
    stats: dict = field(default_factory=lambda: dict(videos=0, failed=0, truncated=0, skipped=0, frames=0,
                                                     decode_s=0.0, encode_s=0.0))

    def run(self, jobs: list[Job]) -> list[dict]:
        """Encode ``jobs`` (already this rank's share); returns their index records. With an
        ``out_dir``, a job whose complete result is there (same settings, whole files) is skipped;
        one done with other settings, or whose files are missing or cut, is encoded again (the
        reasons are printed)."""
        problems, redo = [], {}
        if self.out_dir:
            remove_leftovers(self.out_dir, self.rank, self.world)
        done = read_index(self.out_dir, problems) if self.out_dir else {}
        owners = {rec["output"].casefold(): key for key, rec in done.items() if rec.get("status") in DONE}
        todo = []
        for job in jobs:
            source = source_of(job.path) if self.out_dir and not job.error else None
            key = video_key(job.path, source)
            if owners.get(job.name.casefold(), key) != key:  # another video's output (an earlier run's) has this name
                job = dataclasses.replace(job, name=f"{job.name[:-4]}-{_tag(key)}.npy")
            rec = done.get(key)
            why = self._stale(job, rec, source) if rec is not None and rec.get("status") in DONE else "new"
            if why is None:
                self.stats["skipped"] += 1
                continue
            self._previous[job.index] = (source, rec)
            if why != "new":
                redo[why] = redo.get(why, 0) + 1
            todo.append(job)
        for line in problems + [f"{n} video(s) done before are encoded again: {why}" for why, n in redo.items()]:
            print(f"note: {line}", file=sys.stderr)
        by_index = {job.index: job for job in todo}
        decoded = ClipSource(todo, self.frames, self.size, self.window, self.stride, self.fps, self.timeout)
        loader = torch.utils.data.DataLoader(decoded, batch_size=None, num_workers=min(self.workers, len(todo)),
                                             pin_memory=self.device.type == "cuda")
        bar = self._bar(len(jobs))
        if bar is not None and self.stats["skipped"]:
            bar.update(self.stats["skipped"])
        clips: dict[int, list] = {}
        pending: list = []
        records = []
        start = time.perf_counter()
        for message in loader:
            if message[0] == "clip":
                _, job_index, i, frames, t0, t1 = message
                pending.append((job_index, i, frames, t0, t1))
                if len(pending) >= self.batch:
                    self._encode(pending, clips)
                    pending = []
                continue
            _, job_index, meta = message
            self._encode(pending, clips)
            pending = []
            records.append(self._finish(by_index[job_index], meta, clips.pop(job_index, [])))
            if bar is not None:
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix(videos_s=f"{self.stats['videos'] / elapsed:.2f}",
                                frames_s=f"{self.stats['frames'] / elapsed:.1f}", refresh=False)
        if bar is not None:
            bar.close()
        self.stats["wall_s"] = time.perf_counter() - start
        return records

    @property
    def settings_id(self) -> str:
        return settings_id(self.settings)

    @staticmethod
    def _own_files(job: Job) -> dict:
        """Every file a result of ``job`` may have, by kind (relative to ``out_dir``), whatever the
        settings: ``<stem>.npy``, ``<stem>.frames.npy``, ``<stem>.times.npy``."""
        stem = job.name[:-4]
        return {"output": job.name, "frames_output": stem + ".frames.npy", "times_output": stem + ".times.npy"}

    def _outputs(self, job: Job) -> dict:
        """The files of one video's result with this run's settings, by kind (relative to ``out_dir``)."""
        files = self._own_files(job)
        return {kind: name for kind, name in files.items()
                if kind == "output" or (kind == "frames_output" and self.per_frame)
                or (kind == "times_output" and self.window is not None)}

    def _stale(self, job: Job, rec: dict, source: dict | None) -> str | None:
        """Why the complete record ``rec`` of ``job`` cannot be reused (None when it can)."""
        if rec.get("settings_id") != self.settings_id:
            old = rec.get("settings") if isinstance(rec.get("settings"), dict) else None
            if old is None:
                return "their records do not say which settings made them"
            changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in self.settings.items() if old.get(k) != v]
            return "made with other settings (" + ", ".join(changed or ["settings differ"]) + ")"
        old = rec.get("source")
        if not isinstance(old, dict) or "size" not in old or "mtime_ns" not in old:
            return "their records do not identify the video file (size, modification time)"
        if source is None or (old["size"], old["mtime_ns"]) != (source["size"], source["mtime_ns"]):
            return "the video file changed since (size or modification time)"
        shapes = rec.get("shapes") if isinstance(rec.get("shapes"), dict) else {}
        for kind, name in self._outputs(job).items():
            if rec.get(kind) != name:
                return f"their {kind.replace('_', ' ')} is not {name} (output names changed)"
            if not isinstance(shapes.get(kind), list):
                return "their records do not give the shapes of their outputs"
            if not _whole(os.path.join(self.out_dir, name), shapes[kind]):
                return f"their {kind.replace('_', ' ')} file is missing, incomplete or not of the recorded shape"
        return None

    def _bar(self, total):
        if not self.progress or self.rank != 0:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            return None
        desc = "videos" if self.world == 1 else f"videos (rank 0 of {self.world})"
        return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True)

    def _chunk(self, n_frames: int) -> int | None:
        """``chunk_frames`` for a clip: as given, or chosen when one activation of the clip would
        take more than a quarter of the free memory (long windows)."""
        if self.chunk_frames is not None or n_frames <= 32:
            return self.chunk_frames
        cfg = self.encoder.config
        tokens = (cfg["input_resolution"] // cfg["patch_size"]) ** 2 + 1
        per_frame = tokens * cfg["width"] * torch.finfo(self.dtype).bits // 8 * 12  # activation + intermediates
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else _free_cpu_memory()
        if free is None or per_frame * n_frames * self.batch <= free // 4:
            return None
        return max(1, int(free // 4 // per_frame))

    @torch.no_grad()
    def _encode(self, pending, clips) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        by_len: dict[int, list] = {}
        for item in pending:
            by_len.setdefault(item[2].shape[0], []).append(item)
        for n_frames, items in by_len.items():
            video = torch.stack([it[2] for it in items]).to(self.device, self.dtype, non_blocking=True)
            feats = self.encoder.forward_features(video, chunk_frames=self._chunk(n_frames))
            for k, (job_index, i, _, start, end) in enumerate(items):
                clips.setdefault(job_index, []).append(
                    (i, feats.video_embeds[k].float().cpu().numpy(), feats.frame_embeds[k].float().cpu().numpy(),
                     start, end))
            self.stats["frames"] += n_frames * len(items)
        self.stats["encode_s"] += time.perf_counter() - t0

    def _finish(self, job: Job, meta: dict, clips: list) -> dict:
        clips.sort(key=lambda c: c[0])
        source, previous = self._previous.pop(job.index, (None, None))
        rec = dict(path=job.path, output=job.name, **{k: v for k, v in meta.items() if k != "sampled"})
        rec["source"] = source or {"path": video_key(job.path)}
        rec.update(settings=self.settings, settings_id=self.settings_id)
        self.stats["decode_s"] += meta.get("decode_s", 0.0)
        if meta["status"] in DONE and not clips:
            rec.update(status="failed", error="no frames were decoded")
        if rec["status"] == "failed":
            self.stats["failed"] += 1
            print(f"error: {job.path}: {rec['error']}", file=sys.stderr)
        else:
            self.stats["videos"] += 1
            if rec["status"] == "truncated":
                self.stats["truncated"] += 1
                print(f"warning: {job.path}: {'; '.join(rec['warnings'])}", file=sys.stderr)
            embeds = np.stack([c[1] for c in clips])
            per_frame = np.stack([c[2] for c in clips])
            if self.window is None:
                embeds, per_frame = embeds[0], per_frame[0]
            else:
                rec["windows"] = [[round(c[3], 6), round(c[4], 6)] for c in clips]
            if self.out_dir:
                self._write(job, embeds, per_frame, rec)
            else:
                self.results[job.index] = (embeds, per_frame)
        if self.out_dir:
            if previous is not None:
                self._remove_unnamed(job, previous, rec)
            os.makedirs(state_dir(self.out_dir), exist_ok=True)
            append_line(os.path.join(state_dir(self.out_dir), f"index.rank{self.rank}.jsonl"), json.dumps(rec))
        return rec

    def _remove_unnamed(self, job: Job, previous: dict, rec: dict) -> None:
        """Remove the outputs of this video's previous record that ``rec`` no longer names (written
        by an earlier run with other settings, or left by a result that failed now): nothing else
        would say what they are. Only files named by that record and by this video's own output
        names are removed (before the new record is written: a kill in between leaves a record
        whose files are missing, which the next run encodes again)."""
        for kind, name in self._own_files(job).items():
            path = os.path.join(self.out_dir, name)
            if previous.get(kind) == name and rec.get(kind) != name and os.path.isfile(path) \
                    and not os.path.islink(path):
                os.remove(path)

    def _write(self, job: Job, embeds, per_frame, rec) -> None:
        """The video's files, each through a temporary file of the run's own folder; the record then
        names every one of them (``output``, ``frames_output``, ``times_output``)."""
        files = self._outputs(job)
        tmp = tmp_dir(self.out_dir)
        os.makedirs(os.path.dirname(os.path.join(self.out_dir, job.name)), exist_ok=True)
        if "times_output" in files:
            atomic_save(os.path.join(self.out_dir, files["times_output"]),
                        np.asarray(rec["windows"], dtype=np.float64).reshape(-1, 2), tmp, self.rank)
        if "frames_output" in files:
            atomic_save(os.path.join(self.out_dir, files["frames_output"]), per_frame, tmp, self.rank)
        # last: it (with the index line) marks the video complete
        atomic_save(os.path.join(self.out_dir, job.name), embeds, tmp, self.rank)
        rec.update(files)
        shapes = {"output": embeds.shape, "frames_output": per_frame.shape,
                  "times_output": (len(rec.get("windows", ())), 2)}
        rec["shapes"] = {kind: list(shapes[kind]) for kind in files}


def _free_cpu_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


def summary_line(stats: dict, world: int) -> str:
    wall = max(stats.get("wall_s", 0.0), 1e-9)
    n = stats["videos"]
    line = (f"encoded {n} video(s), {stats['failed']} failed, {stats['truncated']} truncated, {stats['skipped']} "
            f"already done, in {wall:.1f}s: {n / wall:.2f} videos/s, {stats['frames'] / wall:.1f} frames/s; decode "
            f"{stats['decode_s']:.1f}s (workers), encode {stats['encode_s']:.1f}s")
    return line + (f" [rank 0 of {world}]" if world > 1 else "")


def nan_rows(shape) -> np.ndarray:
    return np.full(shape, math.nan, dtype=np.float32)
