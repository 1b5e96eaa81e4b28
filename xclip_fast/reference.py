"""The original X-CLIP vision modules, written plainly.

This file is the ground truth of every test and benchmark: it computes exactly what the official
X-CLIP code (``models/cct.py``, ``models/mit.py``, ``clip/model.py``) computes, in the official
seq-first layout and with the official parameter names, so official state dicts load unchanged.
Nothing here is optimised; where the official code has a quirk, the quirk is kept and documented.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "QuickGELU",
    "ACTIVATIONS",
    "activation",
    "clip_mlp",
    "DropPath",
    "drop_path",
    "LayerNorm",
    "CrossFramelAttentionBlock",
    "ResidualAttentionBlock",
    "cross_frame_block_forward",
    "message_tokens",
    "update_frames",
    "CrossFrameCommunicationTransformer",
    "MultiframeIntegrationTransformer",
    "init_mit_weights",
]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth with the official semantics: one keep/drop draw per entry of the FIRST axis.

    The official blocks call this on seq-first tensors ``(tokens, frames, d)``, so the mask has one
    entry per *token row* (shared by every frame), not one per sample as in timm's image models. We
    keep that quirk: the released models train with rate 0, and matching it exactly lets a model
    fine-tuned with the official code be reproduced bit for bit.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (mask along the first axis, see there)."""

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


# X-CLIP's ``clip.model.LayerNorm`` is a subclass whose fp32 up-cast is commented out: it is exactly
# ``nn.LayerNorm`` (eps 1e-5). Using the class itself keeps ``repr`` and state_dict keys identical.
LayerNorm = nn.LayerNorm


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, CLIP's GELU approximation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# activation names as Hugging Face configs spell them (``hidden_act``) -> module factories
ACTIVATIONS = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``hidden_act``): the table above, else transformers'
    ``ACT2FN`` when transformers is installed; a ``ValueError`` otherwise."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]()
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        ACT2FN = {}
    if name in ACT2FN:
        return ACT2FN[name]
    raise ValueError(f"unknown activation hidden_act={name!r}; known: {sorted(ACTIVATIONS)} (and transformers' "
                     "ACT2FN names when transformers is installed)")


def clip_mlp(d_model: int, hidden: int | None = None, act: str = "quick_gelu") -> nn.Sequential:
    """CLIP's MLP ``c_fc -> gelu -> c_proj``; hidden width 4 x d_model and QuickGELU in every released
    model (the names stay ``c_fc``/``gelu``/``c_proj`` whatever the activation: the keys do not change)."""
    hidden = 4 * d_model if hidden is None else hidden
    if hidden < 1:
        raise ValueError(f"the MLP hidden width must be >= 1, got {hidden}")
    return nn.Sequential(
        OrderedDict(
            [
                ("c_fc", nn.Linear(d_model, hidden)),
                ("gelu", activation(act)),
                ("c_proj", nn.Linear(hidden, d_model)),
            ]
        )
    )


def _mha_self(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask) -> torch.Tensor:
    # As the official code: the mask is cast to the activation dtype (so it is always additive).
    if attn_mask is not None:
        attn_mask = attn_mask.to(dtype=x.dtype, device=x.device)
    return attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]


def cross_frame_block_forward(block: nn.Module, x: torch.Tensor, T: int, attention=None) -> torch.Tensor:
    """The official ``CrossFramelAttentionBlock.forward`` for ``x: (l, b*T, d)``, T given explicitly.

    ``block`` is any module with the official attribute names (the reference block or the fast one).
    ``attention(mha, y, attn_mask)`` computes the self-attention of one ``nn.MultiheadAttention``
    on a seq-first ``y`` (default: the module itself); benchmarks pass another attention kernel
    here to time the original dataflow around it. The two halves are :func:`message_tokens` and
    :func:`update_frames` (the official forward is exactly the one after the other).
    """
    msg = message_tokens(block, x[0], T, attention)
    return update_frames(block, x, msg, attention)


def message_tokens(block: nn.Module, cls: torch.Tensor, T: int, attention=None) -> torch.Tensor:
    """The first half of the official forward: the message tokens ``(b*T, d)`` (video-major) of the
    class tokens ``cls: (b*T, d)``, computed as the official code computes them (``message_fc``,
    cross-frame attention over the T tokens of each video, drop path, residual)."""
    attention = attention or _mha_self
    bt, d = cls.shape
    b = bt // T
    msg_token = block.message_fc(cls.view(b, T, d))
    msg_token = msg_token.view(b, T, 1, d)
    msg_token = msg_token.permute(1, 2, 0, 3).view(T, b, d)
    msg_token = msg_token + block.drop_path(attention(block.message_attn, block.message_ln(msg_token), None))
    return msg_token.view(T, 1, b, d).permute(1, 2, 0, 3).reshape(bt, d)


def update_frames(block: nn.Module, x: torch.Tensor, msg: torch.Tensor, attention=None) -> torch.Tensor:
    """The second half of the official forward: frames ``x: (l, n, d)`` with their message tokens
    ``msg: (n, d)`` appended, intra-frame attention over ``l + 1`` tokens, the message token dropped,
    then the MLP (frames are independent here: any subset of frames can be updated alone)."""
    attention = attention or _mha_self
    l = x.shape[0]
    x = torch.cat([x, msg[None]], dim=0)  # promotes as the official cat does (autocast: msg may be fp16)
    x = x + block.drop_path(attention(block.attn, block.ln_1(x), block.attn_mask))
    x = x[:l, :, :]
    x = x + block.drop_path(block.mlp(block.ln_2(x)))
    return x


class CrossFramelAttentionBlock(nn.Module):
    """The official Cross-frame Communication Transformer block (the official spelling, sic).

    ``x: (l, b*T, d)`` seq-first, frames stacked video-major (frame ``i*T + t`` is frame t of video i).
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, droppath=0.0, T=0, *,
                 mlp_width: int | None = None, hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5):
        super().__init__()
        self.T = T
        self.message_fc = nn.Linear(d_model, d_model)
        self.message_ln = LayerNorm(d_model, eps=layer_norm_eps)
        self.message_attn = nn.MultiheadAttention(d_model, n_head)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model, eps=layer_norm_eps)
        self.drop_path = DropPath(droppath) if droppath > 0.0 else nn.Identity()
        self.mlp = clip_mlp(d_model, mlp_width, hidden_act)
        self.ln_2 = LayerNorm(d_model, eps=layer_norm_eps)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cross_frame_block_forward(self, x, self.T)


class ResidualAttentionBlock(nn.Module):
    """The plain pre-LN transformer block of the MIT (``models/mit.py``), seq-first ``(S, B, d)``."""

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None, *, mlp_width: int | None = None,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.mlp = clip_mlp(d_model, mlp_width, hidden_act)
        self.ln_2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _mha_self(self.attn, self.ln_1(x), self.attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class CrossFrameCommunicationTransformer(nn.Module):
    """The official CCT vision backbone (``models/cct.py``), reference blocks, fixed T.

    ``forward(x: (b*T, 3, H, W)) -> (cls (b*T, E), patch tokens (b*T, l-1, d))``. Blocks are made
    by ``block_class(width, heads, attn_mask, droppath, T, **block_kwargs)`` (subclasses swap in their
    own; ``block_kwargs``: ``mlp_width``, ``hidden_act``, ``layer_norm_eps``).
    """

    block_class = CrossFramelAttentionBlock

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, droppath=None, T: int = 8, *, block_kwargs: dict | None = None):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.T = T
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        droppath = droppath if droppath is not None else [0.0] * layers
        self.transformer = nn.Module()  # keys read transformer.resblocks.{i} as in the official code
        self.transformer.resblocks = nn.Sequential(
            *[self.block_class(width, heads, None, droppath[i], T, **(block_kwargs or {})) for i in range(layers)]
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
        )
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        x = self.transformer.resblocks(x)
        x = x.permute(1, 0, 2)
        cls_x = self.ln_post(x[:, 0, :])
        cls_x = cls_x @ self.proj
        return cls_x, x[:, 1:, :]


def init_mit_weights(m: nn.Module) -> None:
    """The official MIT initialisation (``MultiframeIntegrationTransformer._init_weights``)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


class MultiframeIntegrationTransformer(nn.Module):
    """The official MIT (``models/mit.py``): ``(b, T, E) -> (b, E)``, fixed T, official init.

    Blocks are made by ``block_class(embed_dim, heads, **block_kwargs)``; heads default to
    ``embed_dim // 64``.
    """

    block_class = ResidualAttentionBlock

    def __init__(self, T: int, embed_dim: int = 512, layers: int = 1, heads: int | None = None, *,
                 block_kwargs: dict | None = None):
        super().__init__()
        self.T = T
        heads = heads if heads is not None else embed_dim // 64
        self.positional_embedding = nn.Parameter(torch.empty(1, T, embed_dim))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        self.resblocks = nn.Sequential(*[self.block_class(embed_dim, heads, **(block_kwargs or {}))
                                         for _ in range(layers)])
        self.apply(init_mit_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ori_x = x
        x = x + self.positional_embedding
        x = x.permute(1, 0, 2)
        x = self.resblocks(x)
        x = x.permute(1, 0, 2)
        x = x.type(ori_x.dtype) + ori_x
        return x.mean(dim=1, keepdim=False)
