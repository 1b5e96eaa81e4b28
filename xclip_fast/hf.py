"""Patching a Hugging Face ``transformers`` X-CLIP model in place with the fast modules.

``patch_xclip(model)`` swaps every vision encoder layer and the MIT of an ``XCLIPModel`` (or the
layers of an ``XCLIPVisionModel``) for fast modules that hold the very same parameter objects (no
copies: gradients reach the original parameters, state_dict keys do not change) and take the frame
count from the input, so any T works. ``unpatch_xclip(model)`` puts the original modules back.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from xclip_fast.blocks import Parts, _check_backend, frame_path, message_path, residual_path
from xclip_fast.encoder import interpolate_frames
from xclip_fast.ops import MODULE_BACKENDS, resolve_backend

__all__ = ["patch_xclip", "unpatch_xclip"]

_STATE = "_xclip_fast_patch"

try:  # honours transformers' gradient_checkpointing_enable() like the layers it replaces
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except Exception:  # pragma: no cover - older transformers
    _LayerBase = nn.Module


class _Frames:
    """The frame count of the current call, shared by the patched layers of one model."""

    def __init__(self, default: int):
        self.default = default
        self.current: int | None = None

    def get(self) -> int:
        return self.current if self.current is not None else self.default


def _resolve(backend: str, x: torch.Tensor) -> str:
    backend = resolve_backend(backend, x.device, allowed=MODULE_BACKENDS)
    if backend == "reference":
        raise ValueError("patched Hugging Face layers run 'triton' or 'torch' (unpatch for the original code)")
    return backend


class FastXCLIPVisionEncoderLayer(_LayerBase):
    """Stands in for ``XCLIPVisionEncoderLayer``: same sub-modules (shared), batch-first, fast path.

    Hugging Face applies its drop path to the message branch only; so does this layer.
    """

    def __init__(self, layer: nn.Module, frames: _Frames, backend: str):
        super().__init__()
        for name in ("self_attn", "layer_norm1", "mlp", "layer_norm2", "message_fc", "message_ln", "message_attn",
                     "drop_path"):
            setattr(self, name, getattr(layer, name))
        self.embed_dim = layer.embed_dim
        self.num_frames = layer.num_frames
        self._frames = frames
        self.backend = backend

    def _drop(self, branch: str, y: torch.Tensor) -> torch.Tensor:
        return self.drop_path(y) if branch == "message" else y

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("patched X-CLIP vision layers take no attention_mask (the vision encoder passes none)")
        T = self._frames.get()
        N, l, d = hidden_states.shape
        if N % T != 0:
            raise ValueError(f"{N} frames are not a whole number of videos of T={T} frames")
        backend = _resolve(self.backend, hidden_states)
        parts = Parts(self.message_fc, self.message_ln, self.message_attn, self.layer_norm1, self.self_attn,
                      self.layer_norm2, self.mlp)
        msg = message_path(hidden_states[:, 0], T, parts, backend, self._drop)
        return frame_path(hidden_states, msg, parts, backend, batch_first=True, drop=self._drop)


class FastXCLIPEncoderLayer(_LayerBase):
    """Stands in for the MIT's ``XCLIPEncoderLayer`` (pre-LN self-attention + MLP, batch-first)."""

    def __init__(self, layer: nn.Module, backend: str):
        super().__init__()
        for name in ("self_attn", "layer_norm1", "mlp", "layer_norm2"):
            setattr(self, name, getattr(layer, name))
        self.embed_dim = layer.embed_dim
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("patched X-CLIP MIT layers take no attention_mask (the MIT passes none)")
        backend = _resolve(self.backend, hidden_states)
        return residual_path(hidden_states, self.self_attn, self.layer_norm1, self.mlp, self.layer_norm2, backend,
                             batch_first=True)


class FastMultiframeIntegrationTransformer(nn.Module):
    """Stands in for ``XCLIPMultiframeIntegrationTransformer``: same parameters, any frame count
    (the position embedding is interpolated linearly over time when T differs from the trained one)."""

    def __init__(self, mit: nn.Module):
        super().__init__()
        self.position_embedding = mit.position_embedding
        self.encoder = mit.encoder
        self._original_layers = list(mit.encoder.layers)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        residual = hidden_states
        hidden_states = hidden_states + interpolate_frames(self.position_embedding, hidden_states.shape[1])
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, None)
        last = hidden_states.type(residual.dtype) + residual
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last.mean(dim=1, keepdim=False))


def _with_frames(method, frames: _Frames):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            pixel_values = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() == 5), None)
        previous = frames.current
        frames.current = pixel_values.shape[1] if pixel_values is not None and pixel_values.dim() == 5 else None
        try:
            return method(*args, **kwargs)
        finally:
            frames.current = previous

    return wrapper


def patch_xclip(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap, in place, the vision encoder layers (and the MIT) of a transformers X-CLIP model for
    fast modules sharing the same parameters. Returns ``model``.

    ``model``: an ``XCLIPModel`` or an ``XCLIPVisionModel`` (transformers >= 5). On an
    ``XCLIPModel`` the frame count is read from ``pixel_values (b, T, C, H, W)`` of ``model(...)``
    and ``model.get_video_features(...)``, so any T works; the MIT's frame position embedding is
    interpolated when T differs from ``config.num_frames``. A bare ``XCLIPVisionModel`` receives
    frames ``(b*T, C, H, W)`` and uses ``config.num_frames``. Training keeps working (gradients reach
    the original parameters). Not supported: attention dropout > 0 (raises), ``output_attentions``
    and per-layer ``output_hidden_states`` of the patched layers.
    """
    import transformers
    from transformers.models.x_clip import modeling_x_clip as hfx

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"patch_xclip needs transformers >= 5, found {transformers.__version__}")
    _check_backend(backend)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("this model is already patched (call unpatch_xclip first)")
    if isinstance(model, hfx.XCLIPModel):
        vision = model.vision_model
    elif isinstance(model, hfx.XCLIPVisionModel):
        vision = model
    else:
        raise ValueError(f"expected a transformers XCLIPModel or XCLIPVisionModel, got {type(model).__name__}")
    config = vision.config
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout={config.attention_dropout} is not supported by the fast kernels")
    frames = _Frames(config.num_frames)
    state = {"vision_layers": list(vision.encoder.layers), "mit": None, "methods": []}
    for i, layer in enumerate(state["vision_layers"]):
        vision.encoder.layers[i] = FastXCLIPVisionEncoderLayer(layer, frames, backend)
    if isinstance(model, hfx.XCLIPModel):
        state["mit"] = model.mit
        fast_mit = FastMultiframeIntegrationTransformer(model.mit)
        for j, layer in enumerate(fast_mit._original_layers):
            fast_mit.encoder.layers[j] = FastXCLIPEncoderLayer(layer, backend)
        model.mit = fast_mit
        for name in ("forward", "get_video_features"):
            bound = getattr(model, name)
            object.__setattr__(model, name, _with_frames(bound, frames))
            state["methods"].append(name)
    object.__setattr__(model, _STATE, state)
    return model


def unpatch_xclip(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_xclip`: the original modules (which always kept the parameters) come back."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("this model is not patched")
    from transformers.models.x_clip import modeling_x_clip as hfx

    vision = model.vision_model if isinstance(model, hfx.XCLIPModel) else model
    for i, layer in enumerate(state["vision_layers"]):
        vision.encoder.layers[i] = layer
    if state["mit"] is not None:
        fast_mit = model.mit
        for j, layer in enumerate(fast_mit._original_layers):
            fast_mit.encoder.layers[j] = layer
        model.mit = state["mit"]
    for name in state["methods"]:
        object.__delattr__(model, name)
    object.__delattr__(model, _STATE)
    return model
