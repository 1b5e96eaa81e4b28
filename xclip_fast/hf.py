"""Patching a Hugging Face ``transformers`` X-CLIP model in place with the fast dataflow.

``patch_xclip(model)`` turns every vision encoder layer and the MIT of an ``XCLIPModel`` (or the
layers of an ``XCLIPVisionModel``) into fast modules *in place*: each module object keeps its
identity, sub-modules, parameters, hooks and state_dict keys, and only its class becomes a
subclass of the Hugging Face class with a fast ``forward`` (so ``isinstance`` checks, gradient
checkpointing and ``output_hidden_states`` keep working). ``unpatch_xclip(model)`` puts the
original classes back.

The frame count travels explicitly: a patched ``XCLIPModel`` reads T from ``pixel_values (b, T,
C, H, W)`` and passes ``num_frames=T`` down the model's keyword arguments to every layer, so any T
works; a bare ``XCLIPVisionModel`` takes ``num_frames=`` in its call (default ``config.num_frames``).
``frame_parallel=`` travels the same way (see :func:`patch_xclip`).
The classes are module-level, so a patched model can be deep-copied (EMA, teachers) and pickled
(``torch.save(model)``); the copy computes with its own weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from xclip_fast.blocks import check_backend, is_int, warn_original
from xclip_fast.encoder import interpolate_frames
from xclip_fast.functional import Drop, FusedMLP, Parts, cross_frame_path, residual_path
from xclip_fast.recompute import check_recompute, checkpointed, recompute_level
from xclip_fast.submodules import fused_linear, hook_reason, stock_reason

__all__ = ["patch_xclip", "unpatch_xclip", "is_patched", "set_backend", "set_recompute"]

_CLASSES = ("FastXCLIPVisionEncoderLayer", "FastXCLIPEncoderLayer", "FastXCLIPMultiframeIntegrationTransformer",
            "PatchedXCLIPModel")


# transformers' X-CLIP modeling module and its QuickGELU class, set when the fast classes are built
# (before any patched forward can run). The forwards read them here instead of importing them: torch
# 2.11's dynamo cannot trace an import through transformers' lazy modules (torch.compile stops with
# "Bad import result ... _LazyModule"); torch 2.13's can.
_hfx = None
_QuickGELU = None


def _hf_mlp(mlp: nn.Module):
    """Hugging Face's ``XCLIPMLP`` with QuickGELU as a :class:`FusedMLP` (any hidden width) when all of
    it is plain or its Linears carry a LoRA update the fused MLP applies itself (see
    :func:`xclip_fast.submodules.fused_linear`); any other activation or module, or an otherwise
    wrapped, pruned or hooked one, is called as it is."""
    act = getattr(mlp, "activation_fn", None)
    if stock_reason(mlp, _hfx.XCLIPMLP) is None and type(act) is _QuickGELU and hook_reason(act) is None:
        fc1, fc2 = fused_linear(mlp.fc1), fused_linear(mlp.fc2)
        if fc1 is not None and fc2 is not None:
            return FusedMLP(fc1[0], fc2[0], fc1[1], fc2[1])
    return mlp


# attention implementations that compute softmax attention as eager does (a function registered by
# a user under another name may compute anything: layers using one run their original forward)
_STANDARD_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _attention_reason(attn: nn.Module) -> str | None:
    """None when the fast path may replace this ``XCLIPAttention`` (plain: the stock class, no hooks
    other than transformers' idle output capture, a standard attention implementation)."""
    reason = stock_reason(attn, _hfx.XCLIPAttention)
    if reason:
        return reason
    impl = getattr(attn.config, "_attn_implementation", None) or "eager"
    if impl not in _STANDARD_ATTENTION:
        return f"uses the attention implementation {impl!r}"
    return None


def _collecting_attentions(kwargs: dict) -> bool:
    """Whether the running model call asked for attention weights (``output_attentions=True``, as
    an argument or in the config): transformers collects them with hooks on the attention modules,
    which only the original computation feeds."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - transformers moved it: said, not hidden
        _warn_no_collector()
        return False
    if torch.compiler.is_compiling():  # torch.compile cannot trace ContextVar.get: transformers then keeps
        collected = _active_collector.global_var if getattr(_active_collector, "compiling", False) else None
    else:  # the collector in a plain variable (CompileableContextVar)
        collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


@functools.lru_cache(maxsize=1)
def _warn_no_collector() -> None:
    import warnings

    warnings.warn("xclip_fast: transformers.utils.output_capturing._active_collector is gone in this transformers "
                  "release: output_attentions=True set in a config is not seen by the patched layers (pass it as "
                  "an argument, or unpatch_xclip the model, to get attention weights)", stacklevel=4)


def _runs_original(layer: nn.Module, kwargs: dict, attention_names: tuple) -> bool:
    """Whether ``layer`` runs its original computation this call: attention weights are asked for
    (no warning: the fast path resumes for the other calls), or one of its attention modules is
    not plain (said once, with the reason)."""
    if _collecting_attentions(kwargs):
        return True
    for name in attention_names:
        reason = _attention_reason(getattr(layer, name))
        if reason:
            warn_original(f"a patched {type(layer).__bases__[0].__name__}", f"{name} {reason}")
            return True
    return False


def _original_vision_layer(layer: nn.Module, hidden_states: torch.Tensor, attention_mask, T: int, kwargs: dict,
                           frame_parallel=None):
    """``XCLIPVisionEncoderLayer.forward`` as transformers writes it (every sub-module called), with
    the frame count T given instead of read from the config; with ``frame_parallel``, the message
    tokens of the whole clip are gathered for the message attention and this process's kept."""
    N, l, d = hidden_states.shape
    msg_token = layer.message_fc(hidden_states[:, 0, :]).view(N // T, T, d)
    if frame_parallel is not None:
        msg_token = frame_parallel.gather(msg_token, 1)
    msg_token = msg_token + layer.drop_path(layer.message_attn(layer.message_ln(msg_token), **kwargs)[0])
    if frame_parallel is not None:
        msg_token = frame_parallel.own(msg_token, 1)
    hidden_states = torch.cat([hidden_states, msg_token.reshape(-1, 1, d)], dim=1)
    residual = hidden_states
    hidden_states, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states), attention_mask=attention_mask,
                                       **kwargs)
    hidden_states = (residual + hidden_states)[:, :l, :]
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def _check_backend_for_hf(backend: str) -> str:
    check_backend(backend)
    if backend == "reference":
        raise ValueError("patched Hugging Face layers run 'auto', 'triton' or 'torch' (unpatch_xclip restores the "
                         "original code)")
    return backend


def _frame_count(layer: nn.Module, N: int, num_frames, frame_parallel) -> int:
    """T, the frames per video this process holds in a vision layer's ``N`` frames: ``num_frames``,
    else this process's slice of ``frame_parallel``, else ``config.num_frames``; checked."""
    T = num_frames if num_frames is not None else \
        frame_parallel.local_frames if frame_parallel is not None else layer.num_frames
    if not is_int(T) or T < 1 or N % T != 0:
        raise ValueError(f"{N} frames are not a whole number of videos of num_frames={T!r} frames")
    if frame_parallel is not None:
        frame_parallel.check_local(T, "a patched X-CLIP vision layer")
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            raise ValueError("frame parallelism does not run under Hugging Face's gradient checkpointing (it would "
                             "repeat the frames' exchange in backward): call model.gradient_checkpointing_disable() "
                             "and xclip_fast.hf.set_recompute(model, 'block'), which recomputes each layer without it")
    return T


def _level(layer: nn.Module, x: torch.Tensor) -> str | None:
    """The recompute level of a patched layer for this call (None: autograd does not record it):
    ``"none"`` when Hugging Face's own gradient checkpointing already recomputes the whole layer
    (``gradient_checkpointing_enable()``)."""
    level = recompute_level(layer.xclip_fast_recompute, x, layer)
    if level is not None and getattr(layer, "gradient_checkpointing", False) and layer.training:
        return "none"
    return level


class _MessageDrop(Drop):
    """Hugging Face's drop path: its module (one draw per sample) on the message branch only; not
    given as masks while it drops (the fused layer then leaves the message path to the module)."""

    def __init__(self, drop_path: nn.Module):
        self.drop_path = drop_path
        self.masks = hook_reason(drop_path) is None and (
            isinstance(drop_path, nn.Identity) or not drop_path.training or not drop_path.drop_prob)

    def __call__(self, branch: str, y: torch.Tensor) -> torch.Tensor:
        return self.drop_path(y) if branch == "message" else y


@functools.lru_cache(maxsize=1)
def _classes() -> dict:
    """The fast classes, built on first use (transformers is an optional dependency)."""
    global _hfx, _QuickGELU
    from transformers.activations import QuickGELUActivation
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.x_clip import modeling_x_clip as hfx

    from xclip_fast import hf_parallel

    _hfx, _QuickGELU = hfx, QuickGELUActivation

    class FastXCLIPVisionEncoderLayer(hfx.XCLIPVisionEncoderLayer):
        """An ``XCLIPVisionEncoderLayer`` whose forward is the fast dataflow (batch-first).

        Hugging Face applies its drop path to the message branch only; so does this layer. The
        frame count comes from the ``num_frames`` keyword (default ``config.num_frames``);
        ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`): the layer holds this
        process's frames of each video (``num_frames`` then defaults to their count).
        """

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    num_frames: int | None = None, frame_parallel=None, **kwargs) -> torch.Tensor:
            if attention_mask is not None:
                raise ValueError("patched X-CLIP vision layers take no attention_mask (the vision encoder passes none)")
            T = _frame_count(self, hidden_states.shape[0], num_frames, frame_parallel)
            level = _level(self, hidden_states)
            if _runs_original(self, kwargs, ("message_attn", "self_attn")):
                if frame_parallel is not None and level is not None:  # (no exchange inside a recomputation)
                    level = "none"
                return checkpointed(level, self, _original_vision_layer, self, hidden_states, attention_mask, T, kwargs,
                                    frame_parallel)
            parts = Parts(self.message_fc, self.message_ln, self.message_attn, self.layer_norm1, self.self_attn,
                          self.layer_norm2, _hf_mlp(self.mlp))
            return cross_frame_path(hidden_states, T, parts, self.xclip_fast_backend, batch_first=True,
                                    drop=_MessageDrop(self.drop_path), recompute=level, frame_parallel=frame_parallel,
                                    module=self)

    class FastXCLIPEncoderLayer(hfx.XCLIPEncoderLayer):
        """An MIT ``XCLIPEncoderLayer`` whose forward is the fast pre-LN block (batch-first)."""

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **kwargs) -> torch.Tensor:
            if attention_mask is not None:
                raise ValueError("patched X-CLIP MIT layers take no attention_mask (the MIT passes none)")
            level = _level(self, hidden_states)
            if _runs_original(self, kwargs, ("self_attn",)):
                return checkpointed(level, self, super().forward, hidden_states, attention_mask, **kwargs)
            parts = Parts(None, None, None, self.layer_norm1, self.self_attn, self.layer_norm2, _hf_mlp(self.mlp))
            return residual_path(hidden_states, parts, self.xclip_fast_backend, batch_first=True, recompute=level,
                                 module=self)

    class FastXCLIPMultiframeIntegrationTransformer(hfx.XCLIPMultiframeIntegrationTransformer):
        """The MIT for any frame count: the frame position embedding is interpolated linearly over
        time when T differs from the trained one (``align_corners=True``). With ``frame_parallel``,
        ``hidden_states`` holds this process's frames; the whole clip's are gathered first, so every
        process computes the same video embedding."""

        def forward(self, hidden_states: torch.Tensor, frame_parallel=None, **kwargs):
            if frame_parallel is not None:
                hidden_states = frame_parallel.gather(hidden_states, 1)
            residual = hidden_states
            hidden_states = hidden_states + interpolate_frames(self.position_embedding, hidden_states.shape[1])
            kwargs.pop("num_frames", None)  # the MIT's layers see T in their input
            last = self.encoder(inputs_embeds=hidden_states, **kwargs)[0]  # as transformers calls it
            last = last.type(hidden_states.dtype) + residual
            return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last.mean(dim=1, keepdim=False))

    class PatchedXCLIPModel(hfx.XCLIPModel):
        """An ``XCLIPModel`` that passes the frame count of ``pixel_values`` to its patched layers,
        and takes ``frame_parallel=`` (see :func:`patch_xclip`)."""

        @functools.wraps(hfx.XCLIPModel.get_video_features)
        def get_video_features(self, pixel_values: torch.Tensor, frame_parallel=None, **kwargs):
            kwargs.setdefault("num_frames", pixel_values.shape[1])
            if frame_parallel is None:
                return super().get_video_features(pixel_values, **kwargs)
            return hf_parallel.video_features(self, pixel_values, frame_parallel, **kwargs)

        @functools.wraps(hfx.XCLIPModel.forward)
        def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                    return_loss=None, interpolate_pos_encoding=False, frame_parallel=None, **kwargs):
            if pixel_values is not None:
                kwargs.setdefault("num_frames", pixel_values.shape[1])
            if frame_parallel is not None:
                return hf_parallel.forward(self, input_ids, pixel_values, attention_mask, position_ids, return_loss,
                                           interpolate_pos_encoding, frame_parallel, **kwargs)
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, return_loss=return_loss,
                                   interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)

    built = {}
    for cls in (FastXCLIPVisionEncoderLayer, FastXCLIPEncoderLayer, FastXCLIPMultiframeIntegrationTransformer,
                PatchedXCLIPModel):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as xclip_fast.hf.<name>
        built[cls.__name__] = cls
    # save_pretrained writes the class name into config.json ("architectures"): the original's, so that
    # the folder loads anywhere; pickling uses __qualname__, which stays PatchedXCLIPModel
    PatchedXCLIPModel.__name__ = "XCLIPModel"
    return built


def __getattr__(name: str):
    # the fast classes are module attributes (pickle finds them here) made when first asked for
    if name in _CLASSES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (``get_peft_model``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__module__.startswith("peft.") else model


def _swap(module: nn.Module, cls: type, backend: str | None, recompute: str | None = None) -> None:
    module.__class__ = cls
    if backend is not None:
        module.xclip_fast_backend = backend
        module.xclip_fast_recompute = recompute


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (an ``XCLIPModel`` or ``XCLIPVisionModel``) is patched by :func:`patch_xclip`."""
    from transformers.models.x_clip import modeling_x_clip as hfx

    model = _unwrap(model)
    vision = model.vision_model if isinstance(model, hfx.XCLIPModel) else model
    layers = getattr(getattr(vision, "encoder", None), "layers", [])
    return any(isinstance(layer, _classes()["FastXCLIPVisionEncoderLayer"]) for layer in layers)


def patch_xclip(model: nn.Module, backend: str = "auto", recompute: str = "lean") -> nn.Module:
    """Make the vision encoder layers (and the MIT) of a transformers X-CLIP model fast, in place.
    Returns ``model``.

    ``model``: an ``XCLIPModel`` or an ``XCLIPVisionModel`` (transformers >= 5). The modules keep
    their parameters, hooks and state_dict keys (see the module doc). On an ``XCLIPModel`` the
    frame count is read from ``pixel_values (b, T, C, H, W)`` of ``model(...)`` and
    ``model.get_video_features(...)``, so any T works; the MIT's frame position embedding is
    interpolated when T differs from ``config.num_frames``. A bare ``XCLIPVisionModel`` receives
    frames ``(b*T, C, H, W)`` and takes ``num_frames=T`` (default ``config.num_frames``). Any MLP
    width, activation (QuickGELU is fused, others run as they are) and LayerNorm epsilon. Attention
    dropout in training runs on the torch backend (``backend="auto"``; ``"triton"`` refuses it).
    ``output_hidden_states`` works; ``output_attentions`` too: the layers run their original
    computation for the calls that ask for attention weights. A PEFT model (``get_peft_model``) is
    patched in place too (its base model); LoRA adapters and hooks on the sub-modules apply (see
    :mod:`xclip_fast.submodules` and docs/wrappers.md).

    Frame parallelism (:class:`xclip_fast.parallel.FrameParallel`): pass ``frame_parallel=fp`` to
    ``model(...)`` or ``model.get_video_features(...)`` with this process's frames of each clip in
    ``pixel_values`` (``pixel_values[:, fp.frames]``); text inputs are whole on every process. The
    video embeddings, the prompt-conditioned text embeddings, the logits and the loss are then the
    same on every process as on one process with the whole clip (``vision_model_output`` holds this
    process's frames), and the gradients follow :mod:`xclip_fast.parallel`'s convention (DDP/FSDP2
    over the frame group, or ``fp.average_gradients``). A bare ``XCLIPVisionModel`` takes it too and
    returns this process's frames. Hugging Face's own gradient checkpointing is refused with it (use
    ``recompute="block"``). An *unpatched* model (patch again after ``from_pretrained``) passes the
    keyword down unused and computes each process's frames alone: wrap such calls in
    ``with fp.expect_exchange():``, which raises when no exchange ran.

    ``recompute``: what each patched layer keeps for its backward, as for the fast blocks (``"lean"``,
    ``"min"``, ``"none"``, ``"block"``; see :class:`xclip_fast.blocks.RecomputeMixin`); change it
    later with :func:`set_recompute`. A layer under Hugging Face's own gradient checkpointing
    (``model.gradient_checkpointing_enable()``) is recomputed whole by it and keeps nothing more.
    """
    import transformers
    from transformers.models.x_clip import modeling_x_clip as hfx

    outer, model = model, _unwrap(model)
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"patch_xclip needs transformers >= 5, found {transformers.__version__}")
    _check_backend_for_hf(backend)
    check_recompute(recompute)
    if not isinstance(model, (hfx.XCLIPModel, hfx.XCLIPVisionModel)):
        raise ValueError(f"expected a transformers XCLIPModel or XCLIPVisionModel, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("this model is already patched (call unpatch_xclip first)")
    fast = _classes()
    vision = model.vision_model if isinstance(model, hfx.XCLIPModel) else model
    for layer in vision.encoder.layers:
        _swap(layer, fast["FastXCLIPVisionEncoderLayer"], backend, recompute)
    if isinstance(model, hfx.XCLIPModel):
        for layer in model.mit.encoder.layers:
            _swap(layer, fast["FastXCLIPEncoderLayer"], backend, recompute)
        _swap(model.mit, fast["FastXCLIPMultiframeIntegrationTransformer"], None)
        _swap(model, fast["PatchedXCLIPModel"], None)
    return outer


def unpatch_xclip(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_xclip`: every patched module gets its original class back."""
    from transformers.models.x_clip import modeling_x_clip as hfx

    outer, model = model, _unwrap(model)
    if not isinstance(model, (hfx.XCLIPModel, hfx.XCLIPVisionModel)) or not is_patched(model):
        raise ValueError("this model is not patched")
    vision = model.vision_model if isinstance(model, hfx.XCLIPModel) else model
    layers = list(vision.encoder.layers)
    if isinstance(model, hfx.XCLIPModel):
        layers += list(model.mit.encoder.layers)
        model.mit.__class__ = hfx.XCLIPMultiframeIntegrationTransformer
        model.__class__ = hfx.XCLIPModel
    for layer in layers:
        layer.__class__ = layer.__class__.__bases__[0]
        del layer.xclip_fast_backend, layer.xclip_fast_recompute
    return outer


def set_backend(model: nn.Module, backend: str) -> None:
    """Change the backend of every patched layer of ``model``."""
    _check_backend_for_hf(backend)
    for m in model.modules():
        if hasattr(m, "xclip_fast_backend"):
            m.xclip_fast_backend = backend


def set_recompute(model: nn.Module, recompute: str) -> None:
    """Change what every patched layer of ``model`` keeps for its backward (see :func:`patch_xclip`)."""
    check_recompute(recompute)
    for m in model.modules():
        if hasattr(m, "xclip_fast_recompute"):
            m.xclip_fast_recompute = recompute
