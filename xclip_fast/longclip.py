"""The encoder's long-clip machinery: frames over chunks, frames as they arrive, frames over processes.

- Chunked blocks (:func:`run_blocks`): in every layer the message path sees the whole clip (one
  token per frame) and the intra-frame attention and MLP run over chunks of frames of one shared
  activation, updated in place (inference only).
- Chunked embedding (:func:`embed_frames`): the patch embedding straight into that activation.
- Streaming (:meth:`LongClipMixin.encode_frames`): frames from an iterable (a decoder), embedded
  as they arrive, never all held decoded.
- Frame parallelism passes through: each process runs its own frames and the frame-wide steps
  gather over the group (:mod:`xclip_fast.parallel`).
The encoder (:mod:`xclip_fast.encoder`) holds the modules and their weights and calls these.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from xclip_fast.blocks import is_int
from xclip_fast.recompute import records_autograd
from xclip_fast.submodules import hook_reason
from xclip_fast.video import MEAN, STD

__all__ = ["VideoFeatures", "as_frames", "check_chunk_frames", "refuse_hooks", "run_blocks", "embed_frames",
           "LongClipMixin"]


def refuse_hooks(containers: dict, why: str) -> None:
    """A ``ValueError`` when a container module that is never called has hooks (they would not run)."""
    for name, m in containers.items():
        reason = hook_reason(m)
        if reason:
            raise ValueError(f"{name} {reason}, which would not run: {why}, not {name} as a whole. Register them on "
                             "the blocks (encoder.visual.blocks[i]), encoder.mit or the encoder itself")


def check_chunk_frames(chunk_frames) -> None:
    """``chunk_frames`` is None or an int >= 1 (else a ``ValueError``)."""
    if chunk_frames is not None and (not is_int(chunk_frames) or chunk_frames < 1):
        raise ValueError(f"chunk_frames must be an int >= 1 (or None), got {chunk_frames!r}")


def as_frames(x, what: str = "video") -> torch.Tensor:
    """Frames as float tensors. Floating tensors are taken as normalised already (the model's input);
    ``uint8`` tensors (or numpy arrays) are raw 0-255 RGB and get the official normalisation
    (ImageNet mean/std on 0-255, channels at dim -3); other integer or bool dtypes are refused."""
    if not isinstance(x, torch.Tensor):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is None or not isinstance(x, np.ndarray):
            raise TypeError(f"{what} must be a torch.Tensor (or a numpy array), got {type(x).__name__}")
        x = torch.from_numpy(x)
    if x.dtype == torch.uint8:
        if x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(f"{what}: uint8 frames must have 3 RGB channels at dim -3, got shape {tuple(x.shape)}")
        mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (MEAN, STD))
        return (x.float() - mean) / std
    if not x.is_floating_point():
        raise TypeError(f"{what} must hold floating point (normalised) or uint8 (raw 0-255 RGB) values, got {x.dtype}")
    return x


class VideoFeatures(NamedTuple):
    """``video_embeds (b, E)``; ``frame_embeds (b, T, E)`` (projected class token per frame, MIT
    input); ``last_hidden_state (b, T, l, d)`` (tokens after the last block, class token first)."""

    video_embeds: torch.Tensor
    frame_embeds: torch.Tensor
    last_hidden_state: torch.Tensor


def run_blocks(visual, x: torch.Tensor, T: int, chunk_frames: int, progress=None, frame_parallel=None) -> torch.Tensor:
    """The blocks of the CCT ``visual`` over ``x: (l, N, d)`` with the frame path over chunks of
    ``chunk_frames`` frames, in place (see :meth:`CrossFrameCommunicationTransformer.run_blocks`)."""
    if records_autograd(x, visual):
        raise ValueError("chunk_frames is for inference: run under torch.no_grad() or torch.inference_mode() "
                         "(for training on long clips use recompute='min' or 'block')")
    N = x.shape[1]
    for block in visual.blocks:
        block.check_input(x, T)
        if block.backend == "reference":
            raise ValueError("chunk_frames needs the 'torch' or 'triton' backend, not 'reference'")
        if any(hook_reason(m) for m in block.modules()):  # hooks on it or in it see the whole block's calls
            x = block(x, T, frame_parallel=frame_parallel)
        else:
            msg = block.message_tokens(x, T, frame_parallel)
            for start in range(0, N, chunk_frames):
                stop = min(start + chunk_frames, N)
                x[:, start:stop] = block.update_frames(x[:, start:stop], msg[start:stop])
        if progress is not None:
            progress()
    return x


def embed_frames(visual, frames: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """The patch embedding of ``frames: (N, 3, H, W)`` over groups of ``chunk_frames`` frames, each
    written into one preallocated ``(l, N, d)`` activation."""
    l, N = visual.positional_embedding.shape[0], frames.shape[0]
    x = torch.empty(l, N, visual.conv1.out_channels, device=frames.device, dtype=visual.conv1.weight.dtype)
    for start in range(0, N, chunk_frames):
        part = frames[start:start + chunk_frames]
        visual.embed(part, out=x[:, start:start + part.shape[0]])
    return x


class LongClipMixin:
    """``forward_features`` and ``encode_frames`` of :class:`xclip_fast.encoder.XCLIPVideoEncoder`
    (a module with ``visual``, the CCT, and ``mit``): a clip in one tensor, or one video whose
    frames arrive from an iterable; either over chunks of frames or frame-parallel."""

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        video = as_frames(video, "video")
        if video.dim() != 5:
            raise ValueError(f"video must be 5-D (b, T, 3, H, W), got shape {tuple(video.shape)}")
        if video.shape[0] < 1 or video.shape[1] < 1:
            raise ValueError(f"video needs at least one clip and one frame, got shape {tuple(video.shape)}")
        self.visual.check_frames(video.flatten(0, 1), what=f"video frames (video shape {tuple(video.shape)})")
        return video

    def forward_features(self, video: torch.Tensor, chunk_frames: int | None = None, *,
                         frame_parallel=None) -> VideoFeatures:
        """Video embedding, per-frame embeddings and last hidden tokens of ``video: (b, T, 3, H, W)``.

        ``chunk_frames=k`` (inference only) bounds peak memory: the patch embedding and, in every
        layer, the intra-frame attention and MLP run over chunks of k frames of one shared
        activation; only the message path (one token per frame) sees the whole clip at once.

        ``video`` holds normalised frames (floating point) or raw ``uint8`` RGB frames, which get
        the official normalisation first (ImageNet mean/std on 0-255).

        ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`): the clip's frames are
        spread over the processes of a group and ``video`` holds this process's frames
        ``(b, T_own, 3, H, W)`` (``video[:, fp.frames]`` of the whole clip). Every process returns
        the same ``video_embeds`` and the whole clip's ``frame_embeds`` ``(b, T, E)``;
        ``last_hidden_state`` holds its own frames. Gradients are made for averaging over the
        frame group (see :mod:`xclip_fast.parallel`).
        """
        video = self._check_video(video)
        if frame_parallel is not None:
            frame_parallel.check_local(video.shape[1], "video")
        check_chunk_frames(chunk_frames)
        refuse_hooks({"visual": self.visual}, "the encoder runs the CCT's embedding, blocks and head itself")
        b, T = video.shape[:2]
        frames = video.flatten(0, 1)
        if chunk_frames is None or self.visual.whole_embedding_reason():  # (hooks see the official call)
            x = self.visual.embed(frames)
            self._apply_budget(x)
        else:
            x = embed_frames(self.visual, frames, chunk_frames)
        x = self.visual.run_blocks(x, T, chunk_frames, frame_parallel=frame_parallel)
        frame_embeds = self.visual.head(x).view(b, T, -1)
        if frame_parallel is not None:
            frame_embeds = frame_parallel.gather(frame_embeds, 1)
        video_embeds = self.mit(frame_embeds)
        return VideoFeatures(video_embeds, frame_embeds, x.transpose(0, 1).unflatten(0, (b, T)))

    @torch.no_grad()
    def encode_frames(self, frames, num_frames: int, chunk_frames: int | None = None, progress=None, *,
                      frame_parallel=None) -> VideoFeatures:
        """Encode one video whose frames arrive from an iterable (e.g. a decoder), inference only.

        ``frames`` yields ``(3, H, W)`` frames or ``(n, 3, H, W)`` groups (tensors or numpy arrays;
        floating point = normalised, ``uint8`` = raw RGB, normalised here), ``num_frames`` in all, in
        order. Each group is patch-embedded as soon as ``chunk_frames`` frames (default 1) have
        arrived, straight into the one activation tensor ``(l, T, d)``, and then dropped.

        What must be held, and why: the embedded tokens of every frame (one activation tensor),
        because the first layer's message attention needs the class token of every frame before
        any frame's tokens can go through that layer, and so on for every layer. Decoded frames are
        never all held at once: at most ``chunk_frames`` of them. ``progress`` is called per block.

        ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`): a long video's frames
        over several processes; each one decodes and passes only its own frames
        (``num_frames == fp.local_frames``, frames ``fp.frames`` of the clip), and every process
        returns the same video embedding (and the whole clip's frame embeddings).
        """
        if frame_parallel is not None:
            frame_parallel.check_local(num_frames, "encode_frames (num_frames)")
        if not is_int(num_frames) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        check_chunk_frames(chunk_frames)
        refuse_hooks({"visual": self.visual}, "the encoder runs the CCT's embedding, blocks and head itself")
        grouped = self.visual.whole_embedding_reason()
        if grouped:
            raise ValueError(f"encode_frames embeds the frames in groups as they arrive, but {grouped}: it would see "
                             "groups of frames, not the clip's one call. Remove it, or decode the clip and call the "
                             "encoder itself (forward / forward_features)")
        step = chunk_frames or 1
        visual = self.visual
        w = visual.conv1.weight
        x = torch.empty(visual.positional_embedding.shape[0], num_frames, w.shape[0], dtype=w.dtype, device=w.device)
        filled, pending = 0, []

        def flush():
            nonlocal filled, pending
            if not pending:
                return
            group = torch.cat(pending).to(w.device)
            visual.check_frames(group, what="frames")
            if filled + group.shape[0] > num_frames:
                raise ValueError(f"more than num_frames={num_frames} frames arrived")
            visual.embed(group, out=x[:, filled:filled + group.shape[0]])
            filled += group.shape[0]
            pending = []

        for frame in frames:
            frame = as_frames(frame, "frames")
            if frame.dim() not in (3, 4):
                raise ValueError(f"frames must be (3, H, W) or (n, 3, H, W), got shape {tuple(frame.shape)}")
            pending.append(frame[None] if frame.dim() == 3 else frame)
            if sum(f.shape[0] for f in pending) >= step:
                flush()
        flush()
        if filled != num_frames:
            raise ValueError(f"expected num_frames={num_frames} frames, got {filled}")
        x = visual.run_blocks(x, num_frames, chunk_frames, progress=progress, frame_parallel=frame_parallel)
        frame_embeds = visual.head(x)[None]
        if frame_parallel is not None:
            frame_embeds = frame_parallel.gather(frame_embeds, 1)
        return VideoFeatures(self.mit(frame_embeds), frame_embeds, x.transpose(0, 1)[None])
