"""Encode: one rank's share of the jobs through the pipeline (plan what to resume, decode in
workers, encode here in batches, write outputs and index records)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from xclip_fast.extract import resume, store
from xclip_fast.extract.decode import ClipSource
from xclip_fast.extract.jobs import Job, video_key


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
        ``out_dir``, the jobs are those :func:`~xclip_fast.extract.resume.prepare` gives (one per
        video, stable output names; the command prepares every job under the folder's lock, then
        shares them out); a job whose complete result is there (same settings, whole files) is
        skipped; one done with other settings, or whose files are missing or cut, is encoded again
        (the reasons are printed)."""
        if self.out_dir:
            store.remove_leftovers(self.out_dir, self.rank, self.world)
        todo, self._previous, skipped = resume.plan(jobs, self.out_dir, self.settings, self._files)
        self.stats["skipped"] += skipped
        by_index = {job.index: job for job in todo}
        decoded = ClipSource(todo, self.frames, self.size, self.window, self.stride, self.fps, self.timeout)
        loader = torch.utils.data.DataLoader(decoded, batch_size=None, num_workers=min(self.workers, len(todo)),
                                             pin_memory=self.device.type == "cuda")
        bar = progress_bar(len(jobs), self.rank, self.world) if self.progress else None
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
        return resume.settings_id(self.settings)

    def _files(self, job: Job) -> dict:
        return store.files_for(job, self.per_frame, self.window is not None)

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
            chunk = self.chunk_frames
            if chunk is None:
                chunk = chunk_for(self.encoder.config, n_frames, self.batch, self.dtype, self.device)
            feats = self.encoder.forward_features(video, chunk_frames=chunk)
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
        if meta["status"] in store.DONE and not clips:
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
                store.write_outputs(self.out_dir, self._files(job), embeds, per_frame, rec, self.rank)
            else:
                self.results[job.index] = (embeds, per_frame)
        if self.out_dir:
            if previous is not None:
                store.remove_unnamed(self.out_dir, job, previous, rec)
            store.append_record(self.out_dir, self.rank, rec)
        return rec


def chunk_for(config: dict, frames: int, batch: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """``chunk_frames`` for clips of ``frames`` frames in batches of ``batch`` (clips of more than 32
    frames only): None while one activation of a batch takes at most a quarter of the free memory,
    else the frames that do (long windows). ``config``: the encoder's."""
    if frames <= 32:
        return None
    tokens = (config["input_resolution"] // config["patch_size"]) ** 2 + 1
    per_frame = tokens * config["width"] * torch.finfo(dtype).bits // 8 * 12  # activation + intermediates
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _free_cpu_memory()
    if free is None or per_frame * frames * batch <= free // 4:
        return None
    return max(1, int(free // 4 // per_frame))


def progress_bar(total: int, rank: int, world: int):
    """A tqdm bar of videos on rank 0 (None on other ranks or without tqdm)."""
    if rank != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    desc = "videos" if world == 1 else f"videos (rank 0 of {world})"
    return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True)


def _free_cpu_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def summary_line(stats: dict, world: int) -> str:
    wall = max(stats.get("wall_s", 0.0), 1e-9)
    n = stats["videos"]
    line = (f"encoded {n} video(s), {stats['failed']} failed, {stats['truncated']} truncated, {stats['skipped']} "
            f"already done, in {wall:.1f}s: {n / wall:.2f} videos/s, {stats['frames'] / wall:.1f} frames/s; decode "
            f"{stats['decode_s']:.1f}s (workers), encode {stats['encode_s']:.1f}s")
    return line + (f" [rank 0 of {world}]" if world > 1 else "")


def nan_rows(shape) -> np.ndarray:
    return np.full(shape, math.nan, dtype=np.float32)
