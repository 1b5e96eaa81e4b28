"""Drop-in X-CLIP blocks: the official constructors, attribute names, state_dict keys and repr,
with a faster forward.

The fast forward (backends ``"torch"`` and ``"triton"``) never concatenates the activation with the
message token: it layer-norms the frame tokens and the message token separately, projects queries
only for the frame tokens, passes the message token's key/value to the attention as one extra
key/value per frame, and runs the out-projection for the frame tokens only. ``"reference"`` runs
the original computation (``reference.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xclip_fast import reference
from xclip_fast.ops import MODULE_BACKENDS, packed_attention, quick_gelu_mlp, resolve_backend
from xclip_fast.reference import DropPath, cross_frame_block_forward

__all__ = ["CrossFrameAttentionBlock", "CrossFramelAttentionBlock", "ResidualAttentionBlock"]


def _check_backend(backend: str) -> str:
    if backend not in MODULE_BACKENDS:
        raise ValueError(f"backend must be one of {MODULE_BACKENDS}, got {backend!r}")
    return backend


def _check_heads(d_model: int, n_head: int) -> None:
    if n_head < 1 or d_model % n_head != 0:
        raise ValueError(f"d_model must be divisible by n_head, got d_model={d_model}, n_head={n_head}")


def _drop_rows(drop_path: nn.Module, training: bool, y: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """The official DropPath of a seq-first tensor with ``rows`` rows, applied along ``dim`` of ``y``.

    Draws exactly the random numbers the official code draws (``rand(rows, 1, 1)``), so train-mode
    results equal the reference under the same seed; ``y`` may hold fewer rows than were drawn
    (the attention branch drops the message token's row after drawing for it).
    """
    if not isinstance(drop_path, DropPath) or not training or drop_path.drop_prob == 0.0:
        return y
    keep_prob = 1 - drop_path.drop_prob
    random_tensor = keep_prob + torch.rand((rows, 1, 1), dtype=y.dtype, device=y.device)
    random_tensor.floor_()
    shape = [1] * y.dim()
    shape[dim] = y.shape[dim]
    return y.div(keep_prob) * random_tensor[: y.shape[dim]].view(shape)


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


class Parts(NamedTuple):
    """The sub-modules one cross-frame layer is made of, whatever the module that owns them.

    Official blocks name them ``message_fc, message_ln, message_attn, ln_1, attn, ln_2, mlp``; the
    Hugging Face layer ``message_fc, message_ln, message_attn, layer_norm1, self_attn, layer_norm2,
    mlp``. Attention modules either hold a packed ``in_proj_weight`` (``nn.MultiheadAttention``) or
    separate ``q_proj/k_proj/v_proj`` (Hugging Face); both have ``num_heads`` and ``out_proj``.
    """

    message_fc: nn.Module
    message_ln: nn.Module
    message_attn: nn.Module
    ln_1: nn.Module
    attn: nn.Module
    ln_2: nn.Module
    mlp: nn.Module


def in_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed ``(3d, d)`` in-projection weight and ``(3d,)`` bias of an attention module.

    Separate q/k/v projections are concatenated on the fly (autograd reaches the originals)."""
    if getattr(attn, "in_proj_weight", None) is not None:
        return attn.in_proj_weight, attn.in_proj_bias
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    return w, b


def _no_drop(branch: str, y: torch.Tensor) -> torch.Tensor:
    return y


def message_path(cls: torch.Tensor, T: int, parts: Parts, backend: str, drop=_no_drop) -> torch.Tensor:
    """Cross-frame fusion attention: ``cls: (b*T, d)`` class tokens -> ``(b*T, d)`` message tokens.

    Runs batch-first over videos ``(b, T, d)``; ``drop("message", y)`` applies the drop path of the
    message branch. This is the only part of a layer that needs every frame of a video at once.
    """
    N, d = cls.shape
    b = N // T
    msg = parts.message_fc(cls).view(b, T, d)
    attn = parts.message_attn
    w, bias = in_projection(attn)
    H = attn.num_heads
    qkv = F.linear(parts.message_ln(msg), w, bias)
    a = packed_attention(qkv.view(b, T, 3, H, d // H), backend=backend)
    a = attn.out_proj(a.reshape(b, T, d))
    return (msg + drop("message", a)).view(N, d)


def frame_path(x: torch.Tensor, msg: torch.Tensor, parts: Parts, backend: str, *, batch_first: bool = False,
               attn_mask: torch.Tensor | None = None, drop=_no_drop) -> torch.Tensor:
    """Intra-frame attention over [frame tokens; message token], then the MLP, for each frame.

    ``x: (l, N, d)`` (or ``(N, l, d)`` with ``batch_first``), ``msg: (N, d)``. The message token is
    never concatenated: it is layer-normed on its own, only its key/value is projected, and it
    enters the attention as one extra key/value per frame. Frames are independent here, so any
    subset of frames (with their message tokens) can be updated on its own.
    ``drop(branch, y)`` with branch ``"attention"`` (``y`` has l token rows of the l+1 the official
    code drew for) or ``"mlp"``.
    """
    if batch_first:
        N, l, d = x.shape
    else:
        l, N, d = x.shape
    attn = parts.attn
    H = attn.num_heads
    w, bias = in_projection(attn)
    qkv = F.linear(parts.ln_1(x), w, bias)  # q, k, v read in place by the kernel
    kv_msg = F.linear(parts.ln_1(msg), w[d:], bias[d:])  # (N, 2d): the message token's k, v
    qkv = qkv.view(N, l, 3, H, d // H) if batch_first else qkv.view(l, N, 3, H, d // H).transpose(0, 1)
    o = packed_attention(qkv, kv_msg.view(N, 2, H, d // H), backend=backend, attn_mask=attn_mask)
    o = o.reshape(N, l, d) if batch_first else o.transpose(0, 1).reshape(l, N, d)
    x = x + drop("attention", attn.out_proj(o))
    return x + drop("mlp", quick_gelu_mlp(parts.mlp, parts.ln_2(x), backend))


def residual_path(x: torch.Tensor, attn: nn.Module, ln_1: nn.Module, mlp: nn.Module, ln_2: nn.Module,
                  backend: str, *, batch_first: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-LN self-attention + MLP (the MIT's block) on ``(S, B, d)`` or batch-first ``(B, S, d)``."""
    if batch_first:
        B, S, d = x.shape
    else:
        S, B, d = x.shape
    H = attn.num_heads
    w, bias = in_projection(attn)
    qkv = F.linear(ln_1(x), w, bias)
    qkv = qkv.view(B, S, 3, H, d // H) if batch_first else qkv.view(S, B, 3, H, d // H).transpose(0, 1)
    o = packed_attention(qkv, backend=backend, attn_mask=attn_mask)
    o = o.reshape(B, S, d) if batch_first else o.transpose(0, 1).reshape(S, B, d)
    x = x + attn.out_proj(o)
    return x + quick_gelu_mlp(mlp, ln_2(x), backend)


class _BackendMixin:
    @property
    def backend(self) -> str:
        """``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``; may be changed at any time."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(value)

    def _resolve(self, x: torch.Tensor) -> str:
        backend = self._backend
        if backend == "auto" and self.attn_mask is not None:
            return "torch"  # the triton kernels take no mask; torch honours it exactly
        if backend == "triton" and self.attn_mask is not None:
            raise ValueError("backend='triton' cannot honour attn_mask; use backend='torch' or 'auto'")
        return resolve_backend(backend, x.device, allowed=MODULE_BACKENDS)


class CrossFrameAttentionBlock(_BackendMixin, reference.CrossFramelAttentionBlock):
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

    ``forward(x)`` takes ``x: (l, b*T, d)`` seq-first, frames stacked video-major (frame ``i*T + t``
    is frame t of video i), and returns the same shape. Parameters and state_dict keys are those of
    the official block (it subclasses :class:`xclip_fast.reference.CrossFramelAttentionBlock`, which
    builds them), so official checkpoints load unchanged.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, droppath=0.0, T=0,
                 *, backend: str = "auto"):
        _check_heads(d_model, n_head)
        super().__init__(d_model, n_head, attn_mask, droppath, T)
        self.backend = backend

    def _check_input(self, x: torch.Tensor, T) -> None:
        d = self.message_fc.in_features
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (l, b*T, d), got shape {tuple(x.shape)}")
        problems = []
        if x.shape[-1] != d:
            problems.append(f"last dim of x must be d_model={d}, got {x.shape[-1]} (shape {tuple(x.shape)})")
        if not isinstance(T, int) or T < 1:
            problems.append(f"T must be an int >= 1 (frames per video), got T={T!r}")
        elif x.shape[1] % T != 0:
            problems.append(f"second dim of x (b*T={x.shape[1]}) must be divisible by T={T}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            problems.append(f"x must have at least one token and one frame, got shape {tuple(x.shape)}")
        if problems:
            raise ValueError("CrossFrameAttentionBlock: " + "; ".join(problems))

    def forward(self, x: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """``x: (l, b*T, d) -> (l, b*T, d)``; ``T`` defaults to the constructor's."""
        T = self.T if T is None else T
        self._check_input(x, T)
        backend = self._resolve(x)
        if backend == "reference":
            return cross_frame_block_forward(self, x, T)
        return self._fast_forward(x, T, backend)

    @property
    def parts(self) -> Parts:
        return Parts(self.message_fc, self.message_ln, self.message_attn, self.ln_1, self.attn, self.ln_2, self.mlp)

    def _drop(self, l: int, T: int):
        """The official drop path of each branch, in the official row counts (see ``_drop_rows``)."""
        if not isinstance(self.drop_path, DropPath) or not self.training:
            return _no_drop
        rows = {"message": (T, 1), "attention": (l + 1, 0), "mlp": (l, 0)}

        def drop(branch, y):
            n, dim = rows[branch]
            return _drop_rows(self.drop_path, True, y, n, dim)

        return drop

    def message_tokens(self, x: torch.Tensor, T: int, backend: str) -> torch.Tensor:
        """The message tokens ``(b*T, d)`` of ``x: (l, b*T, d)`` (needs the class tokens only)."""
        return message_path(x[0], T, self.parts, backend, self._drop(x.shape[0], T))

    def update_frames(self, x: torch.Tensor, msg: torch.Tensor, backend: str, T: int = 1) -> torch.Tensor:
        """Intra-frame attention and MLP of frames ``x: (l, n, d)`` given their message tokens ``(n, d)``."""
        mask = _sdpa_mask(self.attn_mask, x.dtype, x.shape[1], self.attn.num_heads, x.shape[0], x.shape[0] + 1)
        return frame_path(x, msg, self.parts, backend, attn_mask=mask, drop=self._drop(x.shape[0], T))

    def _fast_forward(self, x: torch.Tensor, T: int, backend: str) -> torch.Tensor:
        msg = self.message_tokens(x, T, backend)
        return self.update_frames(x, msg, backend, T)


CrossFramelAttentionBlock = CrossFrameAttentionBlock  # the official spelling


class ResidualAttentionBlock(_BackendMixin, reference.ResidualAttentionBlock):
    """Drop-in replacement for the MIT's ``ResidualAttentionBlock`` (pre-LN self-attention + MLP).

    ``forward(x)`` takes ``x: (S, B, d)`` seq-first and returns the same shape. ``attn_mask``:
    additive ``(S, S)`` or ``(B*n_head, S, S)``, honoured by the torch and reference backends.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, *, backend: str = "auto"):
        _check_heads(d_model, n_head)
        super().__init__(d_model, n_head, attn_mask)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ln_1.normalized_shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d or min(x.shape) < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ResidualAttentionBlock: x must be (S, B, d={d}) with S, B >= 1, got {shape}")
        backend = self._resolve(x)
        if backend == "reference":
            return super().forward(x)
        S, B, _ = x.shape
        mask = _sdpa_mask(self.attn_mask, x.dtype, B, self.attn.num_heads, S, S)
        return residual_path(x, self.attn, self.ln_1, self.mlp, self.ln_2, backend, attn_mask=mask)
