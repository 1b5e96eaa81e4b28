"""The X-CLIP video encoder on the fast blocks: the CCT vision backbone, the MIT and both joined.

Module structure and state_dict keys are the official ones (``visual.*``, ``mit.*`` of an official
X-CLIP checkpoint), so official weights load unchanged; ``checkpoints.py`` converts Hugging Face
weights. Unlike the official code, the number of frames T comes from the input at run time.
"""

from __future__ import annotations

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
)
from xclip_fast.budget import BudgetMixin
from xclip_fast.longclip import (
    LongClipMixin,
    VideoFeatures,
    as_frames,  # noqa: F401 (part of this module's interface before the long-clip code moved out)
    check_chunk_frames,
    refuse_hooks,
)
from xclip_fast.longclip import run_blocks as run_chunked
from xclip_fast.recompute import check_budget, check_recompute
from xclip_fast.submodules import layer_norm_reason, stock_reason

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



def _config_problems(sizes: dict, droppath, recompute, use_checkpoint: bool, layer_norm_eps) -> tuple[list, object]:
    """What is wrong with an encoder configuration (``sizes``: the int sizes; the two MLP widths
    None where defaulted), and its recompute level (None when that is what is wrong)."""
    sizes = {k: v for k, v in sizes.items() if v is not None or not k.endswith("intermediate_size")}
    problems = [f"{k}={v!r} must be an int >= 1" for k, v in sizes.items() if not is_int(v) or v < 1]
    if not problems:
        if sizes["input_resolution"] % sizes["patch_size"] != 0:
            problems.append(f"input_resolution={sizes['input_resolution']} must be a multiple of "
                            f"patch_size={sizes['patch_size']}")
        if sizes["width"] % sizes["heads"] != 0:
            problems.append(f"width={sizes['width']} must be divisible by heads={sizes['heads']}")
        if sizes["embed_dim"] % sizes["mit_heads"] != 0:
            problems.append(f"embed_dim={sizes['embed_dim']} must be divisible by mit_heads={sizes['mit_heads']}")
    if not 0.0 <= droppath < 1.0:
        problems.append(f"droppath={droppath!r} must be in [0, 1)")
    level = None
    try:
        level = _level(recompute, use_checkpoint, budget=True)
    except ValueError as exc:
        problems.append(str(exc))
    if not layer_norm_eps > 0:
        problems.append(f"layer_norm_eps={layer_norm_eps!r} must be > 0")
    return problems, level


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
        if chunk_frames is not None:
            return run_chunked(self, x, T, chunk_frames, progress, frame_parallel)
        for block in self.blocks:
            x = block(x, T, frame_parallel=frame_parallel)  # each block applies its recompute level
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


class XCLIPVideoEncoder(LongClipMixin, BudgetMixin, CheckpointAlias, BackendMixin, nn.Module):
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
        problems, level = _config_problems(dict(
            input_resolution=input_resolution, patch_size=patch_size, width=width, layers=layers, heads=heads,
            embed_dim=embed_dim, num_frames=num_frames, mit_layers=mit_layers, mit_heads=mit_heads,
            intermediate_size=intermediate_size, mit_intermediate_size=mit_intermediate_size),
            droppath, recompute, use_checkpoint, layer_norm_eps)
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

    def forward(self, video: torch.Tensor, chunk_frames: int | None = None, *, frame_parallel=None) -> torch.Tensor:
        """``video: (b, T, 3, H, W) -> (b, E)``; see :meth:`forward_features` for ``chunk_frames``
        and ``frame_parallel``."""
        return self.forward_features(video, chunk_frames, frame_parallel=frame_parallel).video_embeds

