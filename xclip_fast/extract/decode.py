"""Decode: the jobs' clips or windows, decoded and preprocessed in ``DataLoader`` worker processes."""

from __future__ import annotations

import time

import torch

from xclip_fast.extract.jobs import Job, span_frames
from xclip_fast.video import VideoError, VideoReader, preprocess


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
                    window = span_frames(self.window, rate)
                    stride = span_frames(self.stride, rate) or window
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

