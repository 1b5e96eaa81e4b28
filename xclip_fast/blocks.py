"""Drop-in X-CLIP blocks: the official constructors, attribute names, state_dict keys and repr,
with a faster forward.

The fast forward (backends ``"torch"`` and ``"triton"``) never concatenates the activation with the
message token: it layer-norms the frame tokens and the message token separately, projects queries
only for the frame tokens, passes the message token's key/value to the attention as one extra
key/value per frame, and runs the out-projection for the frame tokens only. ``"reference"`` runs
the original computation (``reference.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xclip_fast import reference
from xclip_fast.ops import MODULE_BACKENDS, packed_attention, resolve_backend
from xclip_fast.reference import DropPath, LayerNorm, _mlp, cross_frame_block_forward

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


class CrossFrameAttentionBlock(_BackendMixin, nn.Module):
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
    the official block, so official checkpoints load unchanged.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, droppath=0.0, T=0,
                 *, backend: str = "auto"):
        _check_heads(d_model, n_head)
        super().__init__()
        self.backend = backend
        self.T = T
        self.message_fc = nn.Linear(d_model, d_model)
        self.message_ln = LayerNorm(d_model)
        self.message_attn = nn.MultiheadAttention(d_model, n_head)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.drop_path = DropPath(droppath) if droppath > 0.0 else nn.Identity()
        self.mlp = _mlp(d_model)
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

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

    def _fast_forward(self, x: torch.Tensor, T: int, backend: str) -> torch.Tensor:
        l, N, d = x.shape
        b = N // T
        H = self.attn.num_heads
        D = d // H
        # cross-frame fusion attention over each video's T message tokens, batch-first (b, T, d)
        msg = self.message_fc(x[0]).view(b, T, d)
        mattn = self.message_attn
        mqkv = F.linear(self.message_ln(msg), mattn.in_proj_weight, mattn.in_proj_bias)
        ma = packed_attention(mqkv.view(b, T, 3, H, D), backend=backend)
        ma = mattn.out_proj(ma.reshape(b, T, d))
        msg = msg + _drop_rows(self.drop_path, self.training, ma, T, dim=1)
        msg = msg.view(N, d)

        # intra-frame attention over [l frame tokens; message token], without concatenating
        w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        qkv = F.linear(self.ln_1(x), w, bias)  # (l, N, 3d): q, k, v read in place
        kv_msg = F.linear(self.ln_1(msg), w[d:], bias[d:])  # (N, 2d): the message token's k, v
        mask = _sdpa_mask(self.attn_mask, x.dtype, N, H, l, l + 1)
        o = packed_attention(qkv.view(l, N, 3, H, D).transpose(0, 1), kv_msg.view(N, 2, H, D),
                             backend=backend, attn_mask=mask)  # (N, l, H, D)
        o = self.attn.out_proj(o.transpose(0, 1).reshape(l, N, d))
        x = x + _drop_rows(self.drop_path, self.training, o, l + 1, dim=0)
        x = x + _drop_rows(self.drop_path, self.training, self.mlp(self.ln_2(x)), l, dim=0)
        return x


CrossFramelAttentionBlock = CrossFrameAttentionBlock  # the official spelling


class ResidualAttentionBlock(_BackendMixin, nn.Module):
    """Drop-in replacement for the MIT's ``ResidualAttentionBlock`` (pre-LN self-attention + MLP).

    ``forward(x)`` takes ``x: (S, B, d)`` seq-first and returns the same shape. ``attn_mask``:
    additive ``(S, S)`` or ``(B*n_head, S, S)``, honoured by the torch and reference backends.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, *, backend: str = "auto"):
        _check_heads(d_model, n_head)
        super().__init__()
        self.backend = backend
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = _mlp(d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ln_1.normalized_shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d or min(x.shape) < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ResidualAttentionBlock: x must be (S, B, d={d}) with S, B >= 1, got {shape}")
        backend = self._resolve(x)
        if backend == "reference":
            return reference.ResidualAttentionBlock.forward(self, x)
        S, B, _ = x.shape
        H = self.attn.num_heads
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
        mask = _sdpa_mask(self.attn_mask, x.dtype, B, H, S, S)
        o = packed_attention(qkv.view(S, B, 3, H, d // H).transpose(0, 1), backend=backend, attn_mask=mask)
        x = x + self.attn.out_proj(o.transpose(0, 1).reshape(S, B, d))
        x = x + self.mlp(self.ln_2(x))
        return x
