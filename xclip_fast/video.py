"""Reading video files the way the official X-CLIP evaluation does (PyAV, the FFmpeg bindings).

Official test pipeline (``datasets/build.py``): ``SampleFrames(clip_len=1, frame_interval=1,
num_clips=T, test_mode=True)`` (T uniform segments, the middle frame of each), ``Resize`` of the
short side to ``int(256 / 224 * size)`` keeping the aspect ratio (bilinear), ``CenterCrop(size)``,
``Normalize`` with the ImageNet mean/std on 0-255 RGB. Single view (one clip, one crop).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["VideoError", "sample_indices", "count_frames", "preprocess", "read_frames", "load_video",
           "MEAN", "STD"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class VideoError(ValueError):
    """A video that cannot be read or sampled (unreadable file, no video stream, no frames)."""


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The middle frame of each of ``num_frames`` equal segments of a ``total``-frame video (the
    official test-mode sampling; short videos repeat frames)."""
    if total < 1:
        raise VideoError("the video has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    interval = total / float(num_frames)
    return [int(i * interval + interval / 2.0) for i in range(num_frames)]


def _open(path: str):
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading videos needs PyAV: pip install av (or pip install 'xclip-fast[video]')") from exc
    try:
        container = av.open(str(path))
    except Exception as exc:
        raise VideoError(f"cannot open {path} as a video: {type(exc).__name__}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream")
    return container


def count_frames(path: str) -> int:
    """Number of decodable frames (decoded once: container frame counts are often missing or wrong)."""
    container = _open(path)
    try:
        return sum(1 for _ in container.decode(video=0))
    except Exception as exc:
        raise VideoError(f"cannot decode {path}: {type(exc).__name__}: {exc}") from None
    finally:
        container.close()


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


def read_frames(path: str, num_frames: int, size: int = 224) -> Iterator[torch.Tensor]:
    """Yield the ``num_frames`` sampled frames of a video, preprocessed, one ``(3, size, size)`` at
    a time, in order. Only the frame being converted is held in memory."""
    total = count_frames(path)
    indices = sample_indices(total, num_frames)
    wanted = {}
    for pos, idx in enumerate(indices):
        wanted.setdefault(idx, []).append(pos)
    container = _open(path)
    try:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                tensor = preprocess(frame.to_ndarray(format="rgb24"), size)
                for _ in wanted[i]:  # short videos repeat frames
                    yield tensor
            if i >= indices[-1]:
                break
    finally:
        container.close()


def load_video(path: str, num_frames: int, size: int = 224) -> torch.Tensor:
    """All sampled frames as one ``(1, num_frames, 3, size, size)`` tensor."""
    return torch.stack(list(read_frames(path, num_frames, size)))[None]

