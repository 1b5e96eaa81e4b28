"""Drop-in X-CLIP blocks: the official constructors, attribute names, state_dict keys and repr,
with a faster forward.

The fast forward (backends ``"torch"`` and ``"triton"``) never concatenates the activation with the
message token: it layer-norms the frame tokens and the message token separately, projects queries
only for the frame tokens, passes the message token's key/value to the attention as one extra
key/value per frame, and runs the out-projection for the frame tokens only. ``"reference"`` runs
the original computation (``reference.py``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from xclip_fast import reference
from xclip_fast.functional import (
    Drop,
    FusedMLP,
    Parts,
    cross_frame_path,
    frame_path,
    message_path,
    no_drop,
    residual_path,
)
from xclip_fast.ops import MODULE_BACKENDS, autocast_dtype, resolve_backend
from xclip_fast.recompute import check_budget, check_recompute, checkpointed, recompute_level
from xclip_fast.reference import DropPath, QuickGELU, cross_frame_block_forward
from xclip_fast.submodules import fused_linear, hook_reason, mha_reason, stock_reason

__all__ = ["CrossFrameAttentionBlock", "CrossFramelAttentionBlock", "ResidualAttentionBlock", "BackendMixin",
           "RecomputeMixin", "RowDrop", "check_backend", "official_mlp", "is_int", "warn_original"]


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`xclip_fast.ops.MODULE_BACKENDS`, else a ``ValueError``."""
    if backend not in MODULE_BACKENDS:
        raise ValueError(f"backend must be one of {MODULE_BACKENDS}, got {backend!r}")
    return backend


def is_int(v) -> bool:
    """An int (or a symbolic int while ``torch.compile`` traces), not a bool."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_heads(d_model: int, n_head: int) -> None:
    if not is_int(d_model) or not is_int(n_head) or d_model < 1 or n_head < 1 or d_model % n_head != 0:
        raise ValueError(f"d_model must be divisible by n_head, got d_model={d_model}, n_head={n_head}")


def official_mlp(mlp: nn.Module):
    """The official ``Sequential(c_fc, gelu, c_proj)`` with QuickGELU as a :class:`FusedMLP` when all
    of it is plain or its Linears carry a LoRA update the fused MLP applies itself (see
    :func:`xclip_fast.submodules.fused_linear`); any other module (a swapped activation, a user's own
    MLP, an otherwise wrapped, pruned or hooked layer) is returned as it is and called."""
    children = mlp._modules  # (read directly: this runs on every forward)
    if type(mlp) is nn.Sequential and list(children) == ["c_fc", "gelu", "c_proj"]:
        if hook_reason(mlp) is None and stock_reason(children["gelu"], QuickGELU) is None:
            c_fc, c_proj = fused_linear(children["c_fc"]), fused_linear(children["c_proj"])
            if c_fc is not None and c_proj is not None:
                return FusedMLP(c_fc[0], c_proj[0], c_fc[1], c_proj[1])
    return mlp


def drop_path_reason(drop_path: nn.Module) -> str | None:
    """None when the fast path may apply the drop path itself (the official ``DropPath``, drawing the
    official random numbers, or ``nn.Identity``, both without hooks); else why not."""
    if isinstance(drop_path, DropPath):
        return stock_reason(drop_path, DropPath)
    return stock_reason(drop_path, nn.Identity)


def warn_original(what: str, reason: str) -> None:
    """Say once per reason that a module runs its original computation (calling its sub-modules)
    because the fast path could not honour ``reason``. Not while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return
    warnings.warn(f"xclip_fast: {what} runs the original computation, calling its sub-modules, because {reason} "
                  "(the fast path reads the parameters of plain modules only; see docs/wrappers.md)", stacklevel=3)


def _row_mask(keep: float, rows: int, n: int, dim: int, ndim: int, dtype, device) -> torch.Tensor:
    """The official drop-path mask of a seq-first tensor with ``rows`` rows (``rand(rows, 1, 1)``,
    exactly the random numbers the official code draws, so train-mode results equal the reference
    under the same seed), its first ``n`` rows shaped to broadcast along ``dim`` of an ``ndim``-D
    tensor (the attention branch drops the message token's row after drawing for it)."""
    random_tensor = keep + torch.rand((rows, 1, 1), dtype=dtype, device=device)
    random_tensor.floor_()
    shape = [1] * ndim
    shape[dim] = n
    return random_tensor[:n].view(shape)


class RowDrop(Drop):
    """The official drop path of a CCT block's three branches, one draw per token row (see
    :func:`xclip_fast.reference.drop_path`): the message branch draws one per frame of a video
    (``y: (b, T, d)``), the attention branch l+1 token rows (the message token's row is drawn, then
    dropped) and the MLP branch l."""

    def __init__(self, drop_prob: float):
        self.keep = 1 - drop_prob

    def __call__(self, branch: str, y: torch.Tensor) -> torch.Tensor:
        return y.div(self.keep) * self.mask(branch, y.shape, y.dtype, y.device)

    def mask(self, branch: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        if branch == "message":
            return _row_mask(self.keep, shape[1], shape[1], 1, len(shape), dtype, device)
        return _row_mask(self.keep, shape[0] + (branch == "attention"), shape[0], 0, len(shape), dtype, device)


def _sdpa_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype, batch: int, heads: int, rows: int,
               cols: int) -> torch.Tensor | None:
    """An ``nn.MultiheadAttention`` mask ``(L, S)`` or ``(B*H, L, S)`` as an SDPA mask on the first
    ``rows`` queries. Cast to the activation dtype like the official code (so it is additive)."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2 and attn_mask.shape[1] == cols and attn_mask.shape[0] >= rows:
        return attn_mask[:rows].to(dtype)
    if attn_mask.dim() == 3 and attn_mask.shape[0] == batch * heads and attn_mask.shape[2] == cols \
            and attn_mask.shape[1] >= rows:
        return attn_mask.view(batch, heads, attn_mask.shape[1], cols)[:, :, :rows].to(dtype)
    raise ValueError(f"attn_mask must be ({cols}, {cols}) or ({batch * heads}, {cols}, {cols}) here, "
                     f"got {tuple(attn_mask.shape)}")


class BackendMixin:
    """The ``backend`` attribute of every fast module: ``"auto"``, ``"triton"``, ``"torch"`` or
    ``"reference"``, validated when set and passed on to every fast sub-module (an encoder's blocks)."""

    @property
    def backend(self) -> str:
        """``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``; may be changed at any time."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)
        for m in self.modules():
            if isinstance(m, BackendMixin):
                m._backend = value

    def _check_backend_can_run(self, x: torch.Tensor) -> None:
        """An explicit ``backend="triton"`` that cannot run ``x`` fails here, before any work, with
        every reason (``"auto"`` decides per operation and never fails for what torch can do)."""
        if self._backend == "triton":
            cast = autocast_dtype(x.device)
            d = x.shape[-1]
            resolve_backend("triton", x.device, dtype=cast or x.dtype, head_dim=d // self.attn.num_heads,
                            attn_mask=self.attn_mask is not None)


class RecomputeMixin:
    """The ``recompute`` attribute of every fast module: what a block keeps for its backward and
    recomputes in it (:data:`xclip_fast.recompute.RECOMPUTE_LEVELS`), validated when set and passed
    on to every fast sub-module (an encoder's blocks).

    - ``"lean"`` (default): keeps the attention's q/k/v (the in-projection output), its output and
      log-sum-exp, and the MLP pre-activation (8 d-wide rows per token at the released MLP width);
      recomputes the LayerNorms, QuickGELU and the out-projection. About 2.4% more matmul FLOPs.
    - ``"min"``: keeps the MLP pre-activation only (4 rows per token) and also recomputes the
      in-projection and the attention: about 11% more matmul FLOPs.
    - ``"none"``: keeps everything the fast backward uses (11 rows per token), recomputes nothing.
    - ``"block"``: keeps nothing more than the block's input and the message path's few rows per
      frame; also recomputes the MLP's first GEMM (about 22% more).

    It applies only while autograd records the block (inference keeps nothing whatever the level).
    A block whose sub-modules are all plain runs its frame path at every level as one hand-written
    autograd Function (:class:`xclip_fast.fused.FusedLayer`: nothing runs twice in Python, no module
    is called again). Where the attention has no explicit forward and backward (the torch backend on
    CUDA, attention dropout), ``"min"`` keeps q/k/v and the attention output and recomputes the MLP's
    first GEMM instead, and ``"block"`` checkpoints the block whole. A block with a wrapped part (PEFT
    LoRA on the MLP, a hooked LayerNorm, another MLP) runs ``"lean"`` and ``"min"`` through selective
    checkpointing (:func:`xclip_fast.recompute.selective`), or keeps what ``"none"`` keeps where a
    recomputation would call a hook again or the attention drops out, and ``"block"`` checkpoints it
    whole, calling its sub-modules' hooks again in backward; one that runs its original computation
    (the ``"reference"`` backend, wrapped or hooked attention) keeps what the original keeps. Every
    tensor kept goes through the saved-tensor hooks active around the forward
    (``torch.autograd.graph.save_on_cpu`` offloads all of it). See :mod:`xclip_fast.recompute`.

    An encoder also takes a memory budget, a float in (0, 1] (see
    :class:`xclip_fast.encoder.XCLIPVideoEncoder`): its containers then report the budget and each
    block the level it was given.
    """

    takes_budget = False  # the encoder, which assigns levels to its blocks

    @property
    def recompute(self) -> str | float:
        """``"lean"``, ``"min"``, ``"none"`` or ``"block"`` (an encoder: or a budget); settable at any time."""
        return self._recompute

    @recompute.setter
    def recompute(self, value: str | float) -> None:
        if self.takes_budget:
            check_budget(value)
        else:
            check_recompute(value)
        for m in self.modules():
            if isinstance(m, RecomputeMixin) and (isinstance(value, str) or not m.is_layer()):
                m._recompute = value
        if not isinstance(value, str):
            self.plan_budget()

    def is_layer(self) -> bool:
        """Whether this module is one layer (a block), not a container of blocks."""
        return not any(isinstance(m, RecomputeMixin) for m in self.modules() if m is not self)


class CrossFrameAttentionBlock(RecomputeMixin, BackendMixin, reference.CrossFramelAttentionBlock):
    """Drop-in replacement for X-CLIP's ``CrossFramelAttentionBlock``.

    Args:
        d_model: width ``d``.
        n_head: attention heads (``d`` must be divisible by it).
        attn_mask: additive mask of the intra-frame attention, ``(l+1, l+1)`` or
            ``(b*T*n_head, l+1, l+1)`` as for ``nn.MultiheadAttention``; cast to the activation dtype
            as the official code does. ``None`` in every released model. Not supported by the
            triton backend (``"auto"`` then uses ``"torch"``).
        droppath: drop-path rate with the official semantics (one draw per token row, see
            :func:`xclip_fast.reference.drop_path`).
        T: frames per video; may be overridden per call (``forward(x, T=...)``).
        backend: ``"auto"`` (triton for CUDA tensors, torch otherwise), ``"triton"``, ``"torch"`` or
            ``"reference"``; also settable later through the ``backend`` attribute.
        recompute: what the block keeps for its backward, ``"lean"`` (default), ``"min"``, ``"none"``
            or ``"block"`` (see :class:`RecomputeMixin`); also settable later.
        mlp_width, hidden_act, layer_norm_eps: keyword-only, for non-released configurations (any
            Hugging Face config): the MLP's hidden width (default ``4 * d_model``), its activation
            (default ``"quick_gelu"``, which is fused; others run as modules) and the LayerNorm epsilon.

    ``forward(x)`` takes ``x: (l, b*T, d)`` seq-first, frames stacked video-major (frame ``i*T + t``
    is frame t of video i), and returns the same shape. Parameters and state_dict keys are those of
    the official block (it subclasses :class:`xclip_fast.reference.CrossFramelAttentionBlock`, which
    builds them), so official checkpoints load unchanged.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, droppath=0.0, T=0,
                 *, backend: str = "auto", recompute: str = "lean", mlp_width: int | None = None,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5):
        _check_heads(d_model, n_head)
        if not is_int(T) or T < 0:
            raise ValueError(f"T must be an int >= 0 (0: given per call), got T={T!r}")
        check_recompute(recompute)
        super().__init__(d_model, n_head, attn_mask, droppath, T, mlp_width=mlp_width, hidden_act=hidden_act,
                         layer_norm_eps=layer_norm_eps)
        self.backend = backend
        self.recompute = recompute

    def check_input(self, x: torch.Tensor, T) -> None:
        """A ``ValueError`` (``TypeError``) naming the values when ``x``/``T`` are not a valid input."""
        d = self.message_fc.in_features
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (l, b*T, d), got shape {tuple(x.shape)}")
        problems = []
        if x.shape[-1] != d:
            problems.append(f"last dim of x must be d_model={d}, got {x.shape[-1]} (shape {tuple(x.shape)})")
        if not is_int(T) or T < 1:
            problems.append(f"T must be an int >= 1 (frames per video), got T={T!r}")
        elif x.shape[1] % T != 0:
            problems.append(f"second dim of x (b*T={x.shape[1]}) must be divisible by T={T}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            problems.append(f"x must have at least one token and one frame, got shape {tuple(x.shape)}")
        if problems:
            raise ValueError("CrossFrameAttentionBlock: " + "; ".join(problems))

    def original_reason(self) -> str | None:
        """Why this block must run the original computation (a wrapped or hooked attention module or
        drop path, see :mod:`xclip_fast.submodules`), or None when the fast path computes exactly
        what its sub-modules would."""
        modules = self._modules  # (read directly: this runs on every forward)
        for name in ("message_attn", "attn"):
            reason = mha_reason(modules[name])
            if reason:
                return f"{name} {reason}"
        reason = drop_path_reason(modules["drop_path"])
        return f"drop_path {reason}" if reason else None

    def _runs_original(self, frame_parallel=None) -> bool:
        """Whether the original computation runs (said once per reason); a ``ValueError`` if it
        must but frame parallelism is asked for (the original cannot exchange frames)."""
        reason = "backend='reference'" if self._backend == "reference" else self.original_reason()
        if reason and frame_parallel is not None:
            raise ValueError("CrossFrameAttentionBlock: frame parallelism needs the fast path, but this block runs "
                             f"the original computation because {reason}")
        if reason and self._backend != "reference":
            warn_original("CrossFrameAttentionBlock", reason)
        return reason is not None

    def forward(self, x: torch.Tensor, T: int | None = None, *, frame_parallel=None) -> torch.Tensor:
        """``x: (l, b*T, d) -> (l, b*T, d)``; ``T`` defaults to the constructor's.

        ``frame_parallel``: a :class:`xclip_fast.parallel.FrameParallel` when the clip's frames are spread
        over processes: ``x`` then holds this process's frames of each video (``T`` defaults to
        their count) and the message attention sees the whole clip (one exchange of the message
        tokens' inputs). Needs the fast path (not the ``"reference"`` backend, nor wrapped attention)."""
        if frame_parallel is not None:
            T = frame_parallel.local_frames if T is None else T
            frame_parallel.check_local(T, "CrossFrameAttentionBlock's T")
        T = self.T if T is None else T
        self.check_input(x, T)
        level = recompute_level(self._recompute, x, self)
        if self._runs_original(frame_parallel):
            return checkpointed(level, self, cross_frame_block_forward, self, x, T)
        self._check_backend_can_run(x)
        return cross_frame_path(x, T, self.parts, self._backend, attn_mask=self._mask(x), drop=self._drops(),
                                recompute=level, frame_parallel=frame_parallel, module=self)

    @property
    def parts(self) -> Parts:
        """The sub-modules as :mod:`xclip_fast.functional` takes them."""
        m = self._modules  # (read directly: this runs on every forward)
        return Parts(m["message_fc"], m["message_ln"], m["message_attn"], m["ln_1"], m["attn"], m["ln_2"],
                     official_mlp(m["mlp"]), official=True)

    def _drops(self) -> Drop:
        """The drop path of this call (see :class:`RowDrop`)."""
        dp = self.drop_path
        return RowDrop(dp.drop_prob) if isinstance(dp, DropPath) and dp.training and dp.drop_prob else no_drop

    def message_tokens(self, x: torch.Tensor, T: int, frame_parallel=None) -> torch.Tensor:
        """The message tokens ``(b*T, d)`` of ``x: (l, b*T, d)`` (needs the class tokens only);
        ``frame_parallel``: see :meth:`forward`."""
        if self._runs_original(frame_parallel):
            return reference.message_tokens(self, x[0], T)
        return message_path(x[0], T, self.parts, self._backend, self._drops(), frame_parallel)

    def update_frames(self, x: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
        """Intra-frame attention and MLP of frames ``x: (l, n, d)`` given their message tokens ``(n, d)``."""
        if self._runs_original():
            return reference.update_frames(self, x, msg)
        return self._fast_frames(x, msg, self.parts)

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        return _sdpa_mask(self.attn_mask, x.dtype, x.shape[1], self.attn.num_heads, x.shape[0], x.shape[0] + 1)

    def _fast_frames(self, x: torch.Tensor, msg: torch.Tensor, parts: Parts) -> torch.Tensor:
        return frame_path(x, msg, parts, self._backend, attn_mask=self._mask(x), drop=self._drops())


CrossFramelAttentionBlock = CrossFrameAttentionBlock  # the official spelling


class ResidualAttentionBlock(RecomputeMixin, BackendMixin, reference.ResidualAttentionBlock):
    """Drop-in replacement for the MIT's ``ResidualAttentionBlock`` (pre-LN self-attention + MLP).

    ``forward(x)`` takes ``x: (S, B, d)`` seq-first and returns the same shape. ``attn_mask``:
    additive ``(S, S)`` or ``(B*n_head, S, S)``, honoured by the torch and reference backends.
    ``recompute``: as for :class:`CrossFrameAttentionBlock` (see :class:`RecomputeMixin`).
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, *, backend: str = "auto",
                 recompute: str = "lean", mlp_width: int | None = None, hidden_act: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5):
        _check_heads(d_model, n_head)
        check_recompute(recompute)
        super().__init__(d_model, n_head, attn_mask, mlp_width=mlp_width, hidden_act=hidden_act,
                         layer_norm_eps=layer_norm_eps)
        self.backend = backend
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ln_1.normalized_shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d or min(x.shape) < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ResidualAttentionBlock: x must be (S, B, d={d}) with S, B >= 1, got {shape}")
        level = recompute_level(self._recompute, x, self)
        reason = None if self._backend == "reference" else mha_reason(self.attn)
        if reason:
            warn_original("ResidualAttentionBlock", f"attn {reason}")
        if reason or self._backend == "reference":
            return checkpointed(level, self, super().forward, x)
        self._check_backend_can_run(x)
        S, B, _ = x.shape
        mask = _sdpa_mask(self.attn_mask, x.dtype, B, self.attn.num_heads, S, S)
        parts = Parts(None, None, None, self.ln_1, self.attn, self.ln_2, official_mlp(self.mlp))
        return residual_path(x, parts, self._backend, attn_mask=mask, recompute=level, module=self)
