"""The X-CLIP video encoder on the fast blocks: the CCT vision backbone, the MIT and both joined.

Module structure and state_dict keys are the official ones (``visual.*``, ``mit.*`` of an official
X-CLIP checkpoint), so official weights load unchanged; ``checkpoints.py`` converts Hugging Face
weights. Unlike the official code, the number of frames T comes from the input at run time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from xclip_fast import reference
from xclip_fast.blocks import (
    BackendMixin,
    CrossFrameAttentionBlock,
    RecomputeMixin,
    ResidualAttentionBlock,
    check_backend,
    is_int,
    official_mlp,
)
from xclip_fast.functional import mlp_width
from xclip_fast.ops import autocast_dtype
from xclip_fast.recompute import check_budget, check_recompute, level_costs, plan_levels, records_autograd
from xclip_fast.submodules import hook_reason, layer_norm_reason, stock_reason
from xclip_fast.video import MEAN, STD

__all__ = [
    "CrossFrameCommunicationTransformer",
    "MultiframeIntegrationTransformer",
    "XCLIPVideoEncoder",
    "VideoFeatures",
    "PRESETS",
]

# Released X-CLIP vision configs: width, layers, heads, patch, resolution, embed dim, MIT layers and
# heads (official code: embed_dim // 64), frames of the released checkpoints.
PRESETS = {
    "b32": dict(width=768, layers=12, heads=12, patch_size=32, input_resolution=224, embed_dim=512,
                mit_layers=1, mit_heads=8, num_frames=8),
    "b16": dict(width=768, layers=12, heads=12, patch_size=16, input_resolution=224, embed_dim=512,
                mit_layers=1, mit_heads=8, num_frames=8),
    "l14": dict(width=1024, layers=24, heads=16, patch_size=14, input_resolution=224, embed_dim=768,
                mit_layers=1, mit_heads=12, num_frames=8),
    "l14-336": dict(width=1024, layers=24, heads=16, patch_size=14, input_resolution=336, embed_dim=768,
                    mit_layers=1, mit_heads=12, num_frames=16),
}


def _level(recompute: str | float | None, use_checkpoint: bool, budget: bool = False) -> str | float:
    """The recompute level of ``recompute`` and the official ``use_checkpoint`` (an alias of
    "block"); with ``budget``, a memory budget (a float in (0, 1]) is taken too."""
    if use_checkpoint:
        if recompute not in (None, "block"):
            raise ValueError(f"use_checkpoint=True means recompute='block', got recompute={recompute!r} as well")
        return "block"
    recompute = "lean" if recompute is None else recompute
    return check_budget(recompute) if budget else check_recompute(recompute)


def _layer_costs(block: nn.Module, tokens: int, frames: int, sizes: tuple, seq: int) -> dict:
    """:func:`xclip_fast.recompute.level_costs` of a fast block (``tokens`` rows, ``frames``
    message tokens, attention over ``seq``; ``sizes``: its element sizes)."""
    d = block.ln_1.normalized_shape[0]
    hidden = mlp_width(official_mlp(block.mlp)) or 4 * d
    return level_costs(d, hidden, tokens, frames, *sizes, seq=seq)


class CheckpointAlias(RecomputeMixin):
    """``use_checkpoint``, the official name of whole-block checkpointing, as an alias of
    ``recompute == "block"``: setting it True selects ``"block"``; False turns ``"block"`` back into
    the default ``"lean"`` (any other level is kept)."""

    @property
    def use_checkpoint(self) -> bool:
        """Whether the blocks are checkpointed whole (``recompute == "block"``)."""
        return self._recompute == "block"

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        if value:
            self.recompute = "block"
        elif self._recompute == "block":
            self.recompute = "lean"


class CrossFrameCommunicationTransformer(CheckpointAlias, BackendMixin, reference.CrossFrameCommunicationTransformer):
    """The CCT vision backbone (official ``models/cct.py``) on fast blocks.

    Same constructor, parameters and keys as the reference (which builds them, with
    ``block_class``), plus ``recompute`` (what each block keeps for its backward, see
    :class:`xclip_fast.blocks.RecomputeMixin`; ``use_checkpoint=True`` is ``recompute="block"``) and
    ``backend``. ``forward(x: (b*T, 3, H, W), T)``
    returns the projected class token of every frame ``(b*T, E)`` and the patch tokens
    ``(b*T, l-1, d)``, as the official one does. Frames are stacked video-major.
    """

    block_class = CrossFrameAttentionBlock

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, droppath=None, T: int = 8, use_checkpoint: bool = False, *,
                 backend: str = "auto", recompute: str | None = None, block_kwargs: dict | None = None):
        level = _level(recompute, use_checkpoint)
        super().__init__(input_resolution, patch_size, width, layers, heads, output_dim, droppath, T,
                         block_kwargs=block_kwargs)
        self.recompute = level
        self.backend = backend

    @property
    def blocks(self) -> nn.Sequential:
        return self.transformer.resblocks

    def check_frames(self, x: torch.Tensor, what: str = "frames") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must be 4-D (frames, 3, H, W), got {shape}")
        problems = []
        if x.shape[1] != 3:
            problems.append(f"expected 3 channels (RGB), got {x.shape[1]}")
        r = self.input_resolution
        if x.shape[2] != r or x.shape[3] != r:
            problems.append(f"expected {r}x{r} images, got {x.shape[2]}x{x.shape[3]}")
        if problems:
            raise ValueError(f"{what} of shape {tuple(x.shape)}: " + "; ".join(problems))

    def embed(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Patch, class and position embeddings and ``ln_pre``: ``(n, 3, H, W) -> (l, n, d)`` seq-first.

        With ``out`` (a ``(l, n, d)`` view, e.g. frames of a preallocated activation) the result is
        copied there (inference with chunked frames)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # (grid**2, n, d)
        cls = self.class_embedding.to(x.dtype).expand(1, x.shape[1], -1)
        x = torch.cat([cls, x], dim=0) + self.positional_embedding.to(x.dtype)[:, None, :]
        if layer_norm_reason(self.ln_pre):  # called on (n, l, d), as the official forward calls it
            x = self.ln_pre(x.transpose(0, 1)).transpose(0, 1)
        else:
            x = self.ln_pre(x)
        if out is None:
            return x
        out.copy_(x)
        return out

    def whole_embedding_reason(self) -> str | None:
        """Why the patch embedding must see every frame of the clip in one call (the official
        forward's): ``conv1`` or ``ln_pre`` is not plain (hooked, wrapped), so calling it on groups
        of frames would show it other calls; None when groups are exact."""
        reason = stock_reason(self.conv1, nn.Conv2d)
        if reason:
            return f"visual.conv1 {reason}"
        reason = layer_norm_reason(self.ln_pre)
        return f"visual.ln_pre {reason}" if reason else None

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` on the class tokens of ``x: (l, N, d)`` and the projection: ``(N, E)``."""
        return self.ln_post(x[0]) @ self.proj

    def run_blocks(self, x: torch.Tensor, T: int, chunk_frames: int | None = None, progress=None, *,
                   frame_parallel=None) -> torch.Tensor:
        """All blocks over ``x: (l, b*T, d)``.

        ``chunk_frames=k`` (inference only): layer by layer, the message path sees the whole clip
        (one token per frame) and the intra-frame attention and MLP run over chunks of k frames,
        updating ``x`` in place, so peak memory stays near one activation tensor plus the
        intermediates of one chunk. Results equal the unchunked forward to rounding. A block with
        hooks on it or on any of its sub-modules runs whole (its hooks see the calls of an unchunked
        forward), as does the patch embedding when ``conv1`` or ``ln_pre`` is hooked or wrapped.
        ``progress`` (optional) is called once per block. ``frame_parallel``: ``x`` holds this
        process's T frames of each video (see :class:`xclip_fast.parallel.FrameParallel`).
        """
        check_chunk_frames(chunk_frames)
        refuse_hooks({"visual.transformer": self.transformer, "visual.transformer.resblocks": self.blocks},
                     "the blocks are run one by one (each called as a module)")
        if chunk_frames is None:
            for block in self.blocks:
                x = block(x, T, frame_parallel=frame_parallel)  # each block applies its recompute level
                if progress is not None:
                    progress()
            return x
        if records_autograd(x, self):
            raise ValueError("chunk_frames is for inference: run under torch.no_grad() or torch.inference_mode() "
                             "(for training on long clips use recompute='min' or 'block')")
        N = x.shape[1]
        for block in self.blocks:
            block.check_input(x, T)
            if block.backend == "reference":
                raise ValueError("chunk_frames needs the 'torch' or 'triton' backend, not 'reference'")
            if any(hook_reason(m) for m in block.modules()):  # hooks on it or in it see the whole block's calls
                x = block(x, T, frame_parallel=frame_parallel)
                if progress is not None:
                    progress()
                continue
            msg = block.message_tokens(x, T, frame_parallel)
            for start in range(0, N, chunk_frames):
                stop = min(start + chunk_frames, N)
                x[:, start:stop] = block.update_frames(x[:, start:stop], msg[start:stop])
            if progress is not None:
                progress()
        return x

    def forward(self, x: torch.Tensor, T: int | None = None, chunk_frames: int | None = None, *,
                frame_parallel=None):
        """``x: (b*T, 3, H, W)`` -> ``((b*T, E), (b*T, l-1, d))``; with ``frame_parallel`` (see
        :class:`xclip_fast.parallel.FrameParallel`) ``x`` holds this process's frames of each
        video (``T`` defaults to their count) and the outputs are those of its frames."""
        if frame_parallel is not None and T is None:
            T = frame_parallel.local_frames  # (each block checks it against the process's slice)
        T = self.T if T is None else T
        self.check_frames(x)
        h = self.embed(x)
        h = self.run_blocks(h, T, chunk_frames, frame_parallel=frame_parallel)
        return self.head(h), h[1:].transpose(0, 1)


class MultiframeIntegrationTransformer(RecomputeMixin, BackendMixin, reference.MultiframeIntegrationTransformer):
    """The MIT (official ``models/mit.py``): ``(b, T, E) -> (b, E)`` on fast blocks.

    Official constructor ``(T, embed_dim=512, layers=1)`` plus ``heads`` (official: ``embed_dim // 64``)
    and ``backend``; parameters, keys and initialisation come from the reference module.

    Any frame count: when the input has ``T' != T`` frames, the learned frame position embedding
    ``(1, T, E)`` is interpolated linearly over time to ``T'`` points (``align_corners=True``: the
    first and last positions are kept); ``T' == T`` uses it exactly as trained.
    """

    block_class = ResidualAttentionBlock

    def __init__(self, T: int, embed_dim: int = 512, layers: int = 1, heads: int | None = None, *,
                 backend: str = "auto", recompute: str = "lean", block_kwargs: dict | None = None):
        if not is_int(T) or T < 1:
            raise ValueError(f"T must be an int >= 1 (the frames the position embedding is trained for), got {T!r}")
        check_recompute(recompute)
        super().__init__(T, embed_dim, layers, heads, block_kwargs=block_kwargs)
        self.backend = backend
        self.recompute = recompute

    def position_embedding(self, frames: int) -> torch.Tensor:
        """The frame position embedding for ``frames`` frames, ``(1, frames, E)`` (see the class doc)."""
        return interpolate_frames(self.positional_embedding, frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.positional_embedding.shape[-1] or x.shape[1] < 1:
            raise ValueError(f"MIT input must be (b, T, E={self.positional_embedding.shape[-1]}), "
                             f"got {tuple(x.shape)}")
        ori_x = x
        x = x + self.position_embedding(x.shape[1])
        x = self.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = x.type(ori_x.dtype) + ori_x
        return x.mean(dim=1, keepdim=False)


def interpolate_frames(pos: torch.Tensor, frames) -> torch.Tensor:
    """Linear interpolation of a ``(1, T, E)`` frame embedding to ``frames`` points over time.

    ``align_corners`` semantics: point i sits at ``i * (T - 1) / (frames - 1)`` on the trained grid,
    so the first and last embeddings are kept (one point: the first). Written with plain tensor ops
    rather than ``F.interpolate`` so that ``frames`` may be symbolic (``torch.export`` with a dynamic
    T): the exported decomposition of ``upsample_linear1d`` divides by ``frames - 1`` and gives NaN
    at one frame, and a test of ``frames == T`` would pin T to the trained length."""
    T = pos.shape[1]
    if isinstance(frames, int) and frames == T:
        return pos
    if T == 1:
        return pos.expand(1, frames, pos.shape[2])
    where = torch.arange(frames, device=pos.device, dtype=torch.float64 if pos.dtype == torch.float64
                         else torch.float32) * ((T - 1) / torch.sym_max(frames - 1, 1))  # (linspace guards on frames)
    lo = where.floor().long().clamp(max=T - 2)  # the left neighbour; the last point uses (T-2, T-1)
    w = (where - lo).to(pos.dtype)[None, :, None]
    return pos[:, lo] * (1 - w) + pos[:, lo + 1] * w


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


class XCLIPVideoEncoder(CheckpointAlias, BackendMixin, nn.Module):
    """The X-CLIP video encoder: CCT over every frame, then the MIT over the frames of each video.

    ``forward(video)`` with ``video: (b, T, 3, H, W)`` returns the video embedding ``(b, E)``
    (official ``encode_video``'s first output, Hugging Face ``get_video_features().pooler_output``).
    T is read from the input; see :class:`MultiframeIntegrationTransformer` for T other than the
    trained ``num_frames``. Keys: ``visual.*`` and ``mit.*`` as in official checkpoints.

    Args:
        input_resolution, patch_size, width, layers, heads: the vision transformer.
        embed_dim: the projection (and MIT) width E.
        num_frames: the frame count the MIT position embedding is trained for.
        mit_layers, mit_heads: the MIT (official: 1 layer, ``embed_dim // 64`` heads; at least 1).
        droppath: drop-path rate of the last block; block i gets ``linspace(0, droppath, layers)[i]``
            as in the official code.
        recompute: what every block (CCT and MIT) keeps for its backward: ``"lean"`` (default: q/k/v,
            the attention output and the MLP pre-activation; about 2.4% more matmul FLOPs), ``"min"``
            (the MLP pre-activation; about 11% more), ``"none"`` (everything, the fastest) or
            ``"block"`` (its input only: whole-block recomputation, about 22% more). Or a memory
            budget, a float in (0, 1]: the fraction of what ``"none"`` holds that the encoder may
            keep; each block then gets the level that together recompute the fewest matmul FLOPs
            within it (see :meth:`plan_budget`). Applies while autograd records only; settable later
            (see :class:`xclip_fast.blocks.RecomputeMixin`).
        use_checkpoint: ``True`` is ``recompute="block"`` (the official argument, kept as an alias).
        layer_norm_eps: epsilon of every LayerNorm (1e-5 in every released model).
        intermediate_size, mit_intermediate_size: hidden width of the MLPs of the vision blocks and
            of the MIT (default 4 x width, 4 x embed_dim as released; Hugging Face configs may differ).
        hidden_act: the MLP activation, as Hugging Face names it (``"quick_gelu"`` as released, which
            the fast path fuses; ``"gelu"`` and others run as modules).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` for every block; settable
            later through the ``backend`` attribute.

    Raises:
        ValueError: a size that is not a positive int, a width not divisible by its heads, a
            resolution not divisible by the patch size, an unknown activation or backend.
    """

    def __init__(self, *, input_resolution: int = 224, patch_size: int = 32, width: int = 768, layers: int = 12,
                 heads: int = 12, embed_dim: int = 512, num_frames: int = 8, mit_layers: int = 1,
                 mit_heads: int | None = None, droppath: float = 0.0, use_checkpoint: bool = False,
                 recompute: str | None = None, layer_norm_eps: float = 1e-5, intermediate_size: int | None = None,
                 mit_intermediate_size: int | None = None, hidden_act: str = "quick_gelu", backend: str = "auto"):
        super().__init__()
        check_backend(backend)
        if mit_heads is None:
            mit_heads = max(1, embed_dim // 64) if is_int(embed_dim) else embed_dim
        sizes = dict(input_resolution=input_resolution, patch_size=patch_size, width=width, layers=layers,
                     heads=heads, embed_dim=embed_dim, num_frames=num_frames, mit_layers=mit_layers,
                     mit_heads=mit_heads)
        sizes.update({k: v for k, v in (("intermediate_size", intermediate_size),
                                        ("mit_intermediate_size", mit_intermediate_size)) if v is not None})
        problems = [f"{k}={v!r} must be an int >= 1" for k, v in sizes.items() if not is_int(v) or v < 1]
        if not problems:
            if input_resolution % patch_size != 0:
                problems.append(f"input_resolution={input_resolution} must be a multiple of patch_size={patch_size}")
            if width % heads != 0:
                problems.append(f"width={width} must be divisible by heads={heads}")
            if embed_dim % mit_heads != 0:
                problems.append(f"embed_dim={embed_dim} must be divisible by mit_heads={mit_heads}")
        if not 0.0 <= droppath < 1.0:
            problems.append(f"droppath={droppath!r} must be in [0, 1)")
        try:
            level = _level(recompute, use_checkpoint, budget=True)
        except ValueError as exc:
            problems.append(str(exc))
        if not layer_norm_eps > 0:
            problems.append(f"layer_norm_eps={layer_norm_eps!r} must be > 0")
        if problems:
            raise ValueError("XCLIPVideoEncoder: " + "; ".join(problems))
        block = dict(hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
        dpr = [x.item() for x in torch.linspace(0, droppath, layers)] if droppath > 0.0 else None
        self.visual = CrossFrameCommunicationTransformer(
            input_resolution, patch_size, width, layers, heads, embed_dim, droppath=dpr, T=num_frames,
            recompute=level if isinstance(level, str) else "lean", backend=backend,
            block_kwargs=dict(block, mlp_width=intermediate_size),
        )
        self.mit = MultiframeIntegrationTransformer(num_frames, embed_dim, mit_layers, mit_heads, backend=backend,
                                                    block_kwargs=dict(block, mlp_width=mit_intermediate_size))
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = layer_norm_eps
        self.backend = backend
        self.recompute = level
        self.config = dict(input_resolution=input_resolution, patch_size=patch_size, width=width, layers=layers,
                           heads=heads, embed_dim=embed_dim, num_frames=num_frames, mit_layers=mit_layers,
                           mit_heads=mit_heads, droppath=droppath, layer_norm_eps=layer_norm_eps,
                           intermediate_size=intermediate_size or 4 * width,
                           mit_intermediate_size=mit_intermediate_size or 4 * embed_dim, hidden_act=hidden_act)

    takes_budget = True

    # -- the memory budget ----------------------------------------------------------------------------
    def plan_budget(self, frames: int | None = None, sizes: tuple[int, int, int] | None = None) -> list[str]:
        """Give each block (CCT, then MIT) its level under the memory budget ``self.recompute`` and
        return them: the assignment that recomputes the fewest matmul FLOPs while the encoder holds
        at most the budget times what it holds with every block at ``"none"``
        (:func:`xclip_fast.recompute.plan_levels`, from the analytic per-level costs of
        :func:`xclip_fast.recompute.level_costs`; every block ``"block"`` when even that is over it).
        ``frames``: frames in the batch; ``sizes``: element sizes of the residual stream, of the GEMM
        outputs and of the weights' autocast copies (0 without autocast). Each forward plans for its
        own input and autocast; by default, those of the last forward (else ``num_frames`` frames in
        the weights' dtype). Plans are cached per budget, frames and sizes."""
        budget = self._recompute
        if isinstance(budget, str):
            raise ValueError(f"plan_budget needs a budget (recompute is {budget!r})")
        if frames is None:
            size = self.visual.conv1.weight.element_size()
            frames, sizes = self.__dict__.get("_budget_input", (self.visual.T, (size, size, 0)))
        self._budget_input = (frames, sizes)
        l = self.visual.positional_embedding.shape[0]
        layers = [(b, l * frames, frames, l) for b in self.visual.blocks]
        layers += [(b, frames, 0, self.visual.T) for b in self.mit.resblocks]
        key = (budget, frames, sizes, len(layers))
        plans = self.__dict__.setdefault("_budget_plans", {})
        if key not in plans:
            costs = [_layer_costs(b, tokens, n, sizes, seq) for b, tokens, n, seq in layers]
            # what the encoder keeps outside its blocks whatever their levels: two rows per frame token
            # of the patch embedding, and under autocast the frames' and the weights' copies
            conv = self.visual.conv1.weight
            fixed = 2 * l * frames * conv.shape[0] * sizes[0]
            if sizes[0] != conv.element_size() or sizes[2]:
                fixed += frames * 3 * self.visual.input_resolution ** 2 * sizes[1]
                fixed += (conv.numel() + self.visual.proj.numel()) * sizes[2]
            plans[key] = plan_levels(costs, budget, fixed)
        for (block, *_), level in zip(layers, plans[key]):
            block._recompute = level
        return plans[key]

    def _apply_budget(self, x: torch.Tensor) -> None:
        """Under a budget, the levels for this call: its frames and dtypes (``x``: the embedded
        tokens, the residual stream; autocast's dtype and weight copies). Not while ``torch.compile``
        traces: the graph takes the levels the blocks have (planned when the budget was set, or by
        the last eager call)."""
        if torch.compiler.is_compiling():
            return
        if not isinstance(self._recompute, str) and records_autograd(x, self):
            cast = autocast_dtype(x.device)
            if cast is None or x.dtype == torch.float64:
                sizes = (x.element_size(), x.element_size(), 0)
            else:
                weights = self.visual.conv1.weight.dtype
                sizes = (x.element_size(), cast.itemsize, cast.itemsize if weights != cast else 0)
            self.plan_budget(x.shape[1], sizes)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name: str, num_frames: int | None = None, **overrides) -> XCLIPVideoEncoder:
        """A released configuration with random weights initialised as the official code does.

        ``name``: ``"b32"``, ``"b16"``, ``"l14"`` or ``"l14-336"``; ``num_frames`` defaults to the
        released checkpoint's; other constructor arguments may be overridden.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = dict(PRESETS[name])
        if num_frames is not None:
            cfg["num_frames"] = num_frames
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_official(cls, path_or_state_dict, *, strict: bool = True, weights_only: bool = True,
                      **overrides) -> XCLIPVideoEncoder:
        """Load an official X-CLIP checkpoint (``{"model": state_dict}`` file, or the state dict).

        The configuration is read off the weights (heads: ``width // 64`` and ``embed_dim // 64`` as
        in the official code, unless given). Text, prompt and other non-vision keys are skipped and
        listed in ``encoder.load_report``. The encoder takes the dtype of the weights unless
        ``dtype=`` is given; other keyword arguments override the configuration. See
        :mod:`xclip_fast.checkpoints`.
        """
        from xclip_fast.checkpoints import load_official

        return load_official(cls, path_or_state_dict, strict=strict, weights_only=weights_only, **overrides)

    @classmethod
    def from_hf(cls, model_or_state_dict_or_path, *, strict: bool = True, **overrides) -> XCLIPVideoEncoder:
        """Load Hugging Face X-CLIP weights: an ``XCLIPModel``/``XCLIPVisionModel``, its state dict,
        a ``.safetensors``/``.bin`` file, a ``save_pretrained`` folder, or a hub name (needs network).
        The encoder takes the dtype of the weights unless ``dtype=`` is given. See
        :mod:`xclip_fast.checkpoints`."""
        from xclip_fast.checkpoints import load_hf

        return load_hf(cls, model_or_state_dict_or_path, strict=strict, **overrides)

    # -- forward ------------------------------------------------------------------------------------
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
            x = None
            for start in range(0, b * T, chunk_frames):
                part = frames[start:start + chunk_frames]
                if x is None:
                    l = self.visual.positional_embedding.shape[0]
                    x = torch.empty(l, b * T, self.visual.conv1.out_channels, device=video.device,
                                    dtype=self.visual.conv1.weight.dtype)
                self.visual.embed(part, out=x[:, start:start + part.shape[0]])
        x = self.visual.run_blocks(x, T, chunk_frames, frame_parallel=frame_parallel)
        frame_embeds = self.visual.head(x).view(b, T, -1)
        if frame_parallel is not None:
            frame_embeds = frame_parallel.gather(frame_embeds, 1)
        video_embeds = self.mit(frame_embeds)
        return VideoFeatures(video_embeds, frame_embeds, x.transpose(0, 1).unflatten(0, (b, T)))

    def forward(self, video: torch.Tensor, chunk_frames: int | None = None, *, frame_parallel=None) -> torch.Tensor:
        """``video: (b, T, 3, H, W) -> (b, E)``; see :meth:`forward_features` for ``chunk_frames``
        and ``frame_parallel``."""
        return self.forward_features(video, chunk_frames, frame_parallel=frame_parallel).video_embeds

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

