"""Reading video files the way the official X-CLIP evaluation does (PyAV, the FFmpeg bindings).

Official test pipeline (``datasets/build.py``): ``SampleFrames(clip_len=1, frame_interval=1,
num_clips=T, test_mode=True)`` (T uniform segments, the middle frame of each), ``Resize`` of the
short side to ``int(256 / 224 * size)`` keeping the aspect ratio (bilinear), ``CenterCrop(size)``,
``Normalize`` with the ImageNet mean/std on 0-255 RGB. Single view (one clip, one crop).

:class:`VideoReader` opens a file once: the frame count comes from the container (or, when it does
not say, from counting packets, which needs no decoding), and sampled frames are reached by seeking
to the key frame before each one instead of decoding everything before it. Frames are numbered by
their position in the video, as the official code numbers them, never by their timestamps, so
variable-frame-rate videos (phones) sample the same frames: a seek target's timestamp is looked up
in the table of every packet's timestamp (read from the container without decoding). A video that holds
fewer decodable frames than it announces is *truncated*: the reader notices, samples from what it
can read, and says so. Only regular files are opened (a FIFO, a device or a stream address would
block), and FFmpeg's reads time out.
"""

from __future__ import annotations

import math
import os
import stat
from collections import deque
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["VideoError", "VideoFile", "VideoReader", "sample_indices", "preprocess", "check_regular_file",
           "read_frames", "load_video", "MEAN", "STD", "VIDEO_EXTENSIONS"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                    ".3gp", ".ogv", ".mts", ".m2ts")
SEEK_GAP = 48  # frames: a target further ahead than this is reached by seeking, nearer ones by decoding


class VideoError(ValueError):
    """A video that cannot be read or sampled (unreadable file, no video stream, no frames)."""


class _NoTimestamps(Exception):
    """A decoded frame whose timestamp is not in the packet table: positions must be counted."""


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The middle frame of each of ``num_frames`` equal segments of a ``total``-frame video (the
    official test-mode sampling; short videos repeat frames)."""
    if total < 1:
        raise VideoError("the video has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    interval = total / float(num_frames)
    return [int(i * interval + interval / 2.0) for i in range(num_frames)]


def preprocess(rgb: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, size, size)`` float32: short side to ``int(256/224*size)``
    (bilinear, no antialiasing, like OpenCV's INTER_LINEAR), centre crop, ImageNet normalisation."""
    h, w = rgb.shape[:2]
    short = int(256 / 224 * size)
    scale = short / min(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top:top + size, left:left + size]
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading videos needs PyAV: pip install av (or pip install 'xclip-fast[video]')") from exc
    return av


def check_regular_file(path: str) -> None:
    """A ``VideoError`` unless ``path`` is an existing regular file (streams, FIFOs and devices would
    block a reader, URLs are not files)."""
    if "://" in str(path):
        raise VideoError(f"{path}: stream addresses are not read (only video files)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except OSError as exc:
        raise VideoError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise VideoError(f"{path} is a folder")
    if not stat.S_ISREG(mode):
        raise VideoError(f"{path} is not a regular file (a FIFO, socket or device would block): not read")


class VideoFile:
    """One video file, opened once: its metadata, its packets' timestamp table (one demux pass) and
    decoding from any frame position (seeking to the key frame before it). :class:`VideoReader`
    chooses which frames to take. ``timeout``: seconds FFmpeg may wait for data.
    """

    def __init__(self, path: str, timeout: float = 10.0):
        check_regular_file(path)
        av = _av()
        self.path = str(path)
        try:
            self.container = av.open(self.path, timeout=timeout)
        except Exception as exc:
            raise VideoError(f"cannot open {path} as a video: {type(exc).__name__}: {exc}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path} has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        self.fps = float(rate) if rate else 0.0
        self.time_base = self.stream.time_base or Fraction(1, 1)
        self.decoded = 0  # frames decoded by this reader (for throughput reports)
        self._readable = None  # set when the end of the decodable frames was reached
        self._count = None
        self._packets = None  # (count, sorted pts or None), from one demux pass (see _scan)
        self._positions = None  # pts -> position, built once from the sorted pts
        self._moved = False  # demuxed or decoded since opened or rewound

    # -- metadata ------------------------------------------------------------------------------
    def announced_frames(self) -> int:
        """The frame count the container announces, or counted from its packets (no decoding)."""
        if self._count is None:
            n = int(self.stream.frames or 0)
            if n <= 0:
                n = self._count_packets()
            self._count = n
        return self._count

    def _count_packets(self) -> int:
        return self._scan()[0]

    def _scan(self) -> tuple[int, list[int] | None]:
        """One pass over the video packets without decoding, once: their count, and their
        presentation timestamps in presentation order (position i -> pts), or None when some packet
        has no timestamp or two share one (positions are then counted by decoding from the start)."""
        if self._packets is None:
            if self._moved:  # a decode is under way: the scan starts at the first packet
                self._rewind()
            self._moved = True
            n, pts = 0, []
            try:
                for packet in self.container.demux(self.stream):
                    if not packet.size:
                        continue
                    n += 1
                    if packet.pts is None:
                        pts = None
                    elif pts is not None:
                        pts.append(packet.pts)
            except Exception as exc:
                raise VideoError(f"cannot read {self.path}: {type(exc).__name__}: {exc}") from None
            if n:
                self._rewind()
            self._packets = (n, sorted(pts) if pts and len(set(pts)) == len(pts) else None)
        return self._packets

    def duration(self) -> float | None:
        if self.stream.duration is not None:
            return float(self.stream.duration * self.time_base)
        if self.container.duration is not None:
            return self.container.duration / 1_000_000
        return self.announced_frames() / self.fps if self.fps else None

    def info(self) -> dict:
        return dict(fps=self.fps, frames_announced=self.announced_frames(), duration=self.duration())

    @property
    def truncated(self) -> bool:
        """True once the reader found fewer decodable frames than announced."""
        return self._readable is not None and self._readable < self.announced_frames()

    def readable_frames(self) -> int:
        """The frames that can really be decoded (decodes to the end only if that is not known yet)."""
        if self._readable is None:
            last = -1
            for index, _ in self._decode_from(None):
                last = index
            self._readable = last + 1
        return self._readable

    # -- decoding ------------------------------------------------------------------------------
    def _rewind(self) -> None:
        try:
            self.container.seek(0, stream=self.stream, backward=True, any_frame=False)
        except Exception as exc:
            raise VideoError(f"cannot rewind {self.path}: {type(exc).__name__}: {exc}") from None
        self._moved = False

    def _decode_from(self, target: int | None) -> Iterator[tuple[int, object]]:
        """(position, frame) pairs from the key frame before position ``target`` (None: from the start)
        onwards. From the start, positions are counted; after a seek they are looked up in the packet
        table (raises ``_NoTimestamps`` for a frame it does not hold)."""
        position = None
        if target is None or target <= 0:
            self._rewind()
        else:
            table = self._scan()[1]
            if table is None or target >= len(table):
                raise _NoTimestamps()
            if self._positions is None:
                self._positions = {pts: i for i, pts in enumerate(table)}
            position = self._positions
            self.container.seek(table[target], stream=self.stream, backward=True, any_frame=False)
        self._moved = True
        counter = -1
        try:
            for frame in self.container.decode(self.stream):
                counter += 1
                if position is None:
                    index = counter
                elif frame.pts in position:
                    index = position[frame.pts]
                else:
                    raise _NoTimestamps()
                self.decoded += 1
                yield index, frame
        except (VideoError, _NoTimestamps):
            raise
        except Exception as exc:
            raise VideoError(f"cannot decode {self.path}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoReader(VideoFile):
    """One video file, opened once.

    ``info()`` gives frame rate, announced frame count and duration; :meth:`sample` the official
    test-mode frames; :meth:`frames` any frames by index (seeking where that is cheaper than
    decoding); :meth:`windows` the frames of sliding windows, decoded once in order. Frames come
    back as ``(H, W, 3)`` uint8 RGB arrays. ``timeout``: seconds FFmpeg may wait for data.
    """

    def frames(self, indices: list[int], seek: bool = True) -> list[np.ndarray]:
        """The frames at positions ``indices`` (any order, repeats allowed) as RGB arrays. With
        ``seek``, a target more than ``SEEK_GAP`` frames ahead is reached by seeking; otherwise (or
        when the video's timestamps cannot place a frame) every frame up to the last target is
        decoded. Raises ``VideoError`` if a target lies past the readable end (see :meth:`sample`,
        which resamples then)."""
        try:
            return self._frames(indices, seek)
        except _NoTimestamps:
            return self._frames(indices, False)

    def _frames(self, indices: list[int], seek: bool) -> list[np.ndarray]:
        wanted = set(indices)
        got: dict[int, np.ndarray] = {}
        it, position = None, -1
        for target in sorted(wanted):
            if target in got:
                continue
            if it is None or (seek and target - position > SEEK_GAP):
                it = self._decode_from(target if seek else None)
            position = self._collect(it, target, wanted, got)
            if target not in got and position > target:
                # seeking landed after the target (inexact key frames): decode from the start
                it = self._decode_from(None)
                position = self._collect(it, target, wanted, got)
            if target not in got:  # the decoder ran out before the target: a truncated file
                raise VideoError(f"{self.path}: frame {target} is past the last decodable frame "
                                 f"(of {self.announced_frames()} announced)")
        return [got[i] for i in indices]

    @staticmethod
    def _collect(it, target: int, wanted: set, got: dict) -> int:
        """Decode from ``it`` up to ``target``, keeping the wanted frames; the last index reached."""
        position = -1
        for index, frame in it:
            position = index
            if index in wanted and index not in got:
                got[index] = frame.to_ndarray(format="rgb24")
            if index >= target:
                break
        return position

    def sample(self, num_frames: int, seek: bool = True) -> tuple[list[int], list[np.ndarray]]:
        """The official test-mode sample of ``num_frames`` frames: (indices, RGB frames). A truncated
        video is sampled over the frames it really holds (``truncated`` is then True)."""
        total = self.announced_frames()
        if total < 1:
            raise VideoError(f"{self.path}: the video has no frames")
        indices = sample_indices(total, num_frames)
        try:
            return indices, self.frames(indices, seek=seek)
        except VideoError:
            readable = self.readable_frames()
            if readable < 1:
                raise VideoError(f"{self.path}: no decodable frames") from None
            if readable >= total:
                raise
            indices = sample_indices(readable, num_frames)
            return indices, self.frames(indices, seek=seek)

    def windows(self, window: int, stride: int, fps: float | None = None) -> Iterator[tuple[float, float, list]]:
        """Sliding windows of ``window`` frames every ``stride`` frames, frames taken at ``fps``
        (default: every frame of the video; a higher rate repeats frames), decoded once in order:
        yields ``(start s, end s, frames)``. A video shorter than one window gives one window of
        repeated frames (the official sampling)."""
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
        if not (isinstance(window, int) and isinstance(stride, int) and window >= 1 and stride >= 1):
            raise ValueError(f"window and stride must be ints >= 1, got {window!r}, {stride!r}")
        rate = fps or self.fps
        if not rate:
            raise VideoError(f"{self.path}: unknown frame rate (give --fps)")
        step = self.fps / rate if fps else 1.0  # source frames per taken frame
        buffer = deque()  # (taken index, frame) from the start of the next window on
        taken, next_start, next_source = 0, 0, 0.0
        for index, frame in self._decode_from(None):
            rgb = None
            while index + 0.5 >= next_source:  # take this source frame (repeatedly when upsampling)
                next_source += step
                if taken >= next_start:
                    rgb = frame.to_ndarray(format="rgb24") if rgb is None else rgb
                    buffer.append((taken, rgb))
                taken += 1
                if taken == next_start + window:
                    yield next_start / rate, (next_start + window) / rate, [f for _, f in buffer][:window]
                    next_start += stride
                    while buffer and buffer[0][0] < next_start:
                        buffer.popleft()
        if taken == 0:
            raise VideoError(f"{self.path}: no decodable frames")
        if taken < window:  # shorter than one window: the official sampling repeats frames
            frames = [f for _, f in buffer]
            yield 0.0, taken / rate, [frames[i] for i in sample_indices(taken, window)]


def read_frames(path: str, num_frames: int, size: int = 224, seek: bool = True) -> Iterator[torch.Tensor]:
    """Yield the ``num_frames`` sampled frames of a video, preprocessed, one ``(3, size, size)`` at
    a time, in order (the file is opened once; see :class:`VideoReader`)."""
    with VideoReader(path) as reader:
        _, frames = reader.sample(num_frames, seek=seek)
        for rgb in frames:
            yield preprocess(rgb, size)


def load_video(path: str, num_frames: int, size: int = 224) -> torch.Tensor:
    """All sampled frames as one ``(1, num_frames, 3, size, size)`` tensor."""
    return torch.stack(list(read_frames(path, num_frames, size)))[None]
