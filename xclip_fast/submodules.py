"""When may the fast path read a sub-module's parameters instead of calling it?

The fast dataflow (:mod:`xclip_fast.functional`) calls most sub-modules as modules (LayerNorms,
``message_fc``, ``out_proj`` of Hugging Face attention, a non-fused MLP), so whatever wraps or hooks
them applies. A few it does not call: it reads the packed in-projection of an attention module and
the two linear layers of CLIP's MLP, and replaces the attention module and the drop path by its
own computation. Reading parameters is exact only for a *plain* module: the stock class (or a
subclass that keeps its ``forward``, as ``torch.nn.utils.parametrize`` makes, whose parameters
read through the parametrization) with no forward, pre-forward or backward hooks. Anything else
(a PEFT LoRA wrapper, ``prune`` or the old ``weight_norm``, which recompute the weight in a
pre-forward hook, a user's hook, a subclass with its own forward, an ``nn.MultiheadAttention``
with ``add_bias_kv``...) is called as a module instead: the projections and the MLP one by one,
an attention module or drop path by running the original computation of the block.

Each function returns None for a plain module, else the reason in words (for warnings). Global
hooks (``torch.nn.modules.module.register_module_forward_hook``) do not make a module unplain: they
observe the modules that are called, and the fast path calls fewer modules than the original; only
a recomputation that would call modules again in backward asks :func:`global_hook_reason`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

__all__ = ["hook_reason", "global_hook_reason", "param", "linear_reason", "layer_norm_reason", "mha_reason",
           "stock_reason", "transformers_capture_hook", "fused_linear"]

_GLOBAL_HOOKS = (("_global_forward_hooks", "forward hooks"), ("_global_forward_pre_hooks", "forward pre-hooks"),
                 ("_global_backward_hooks", "backward hooks"), ("_global_backward_pre_hooks", "backward pre-hooks"))
_HOOK_DICTS = (("_forward_pre_hooks", "forward pre-hooks"), ("_forward_hooks", "forward hooks"),
               ("_backward_pre_hooks", "backward pre-hooks"), ("_backward_hooks", "backward hooks"))


def transformers_capture_hook(fn) -> bool:
    """A hook that transformers installs to collect ``output_attentions``/``output_hidden_states``:
    it does nothing unless such outputs are being collected (the patched layers check that)."""
    return getattr(fn, "__name__", "") == "output_capturing_hook" and \
        getattr(fn, "__module__", "").startswith("transformers.")


def hook_reason(m: nn.Module) -> str | None:
    """The kinds of hooks registered on ``m`` (transformers' idle output-capture hooks excepted)."""
    if not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
        return None  # (the common case, on every call: no generator, no list)
    kinds = []
    for attr, what in _HOOK_DICTS:
        hooks = getattr(m, attr, None) or {}
        if any(not transformers_capture_hook(h) for h in hooks.values()):
            kinds.append(what)
    return f"has {' and '.join(kinds)}" if kinds else None


def _torch_tracker(fn) -> bool:
    """A global hook of PyTorch's own module trackers (``torch.utils.module_tracker``, used by
    ``FlopCounterMode`` and the memory trackers): it follows the module nesting and is written for
    recomputation in backward."""
    return getattr(fn, "__module__", "").startswith("torch.")


def param(m: nn.Module, name: str):
    """``getattr(m, name, None)`` for a parameter, read from ``m._parameters`` when it is there (the
    fast way, on every forward), else through the attribute (a parametrized one)."""
    params = m._parameters
    return params[name] if name in params else getattr(m, name, None)


def global_hook_reason() -> str | None:
    """The kinds of module hooks registered globally (``register_module_forward_hook`` and its kin)
    by anything but PyTorch's own trackers: every module call runs them, so a recomputation in
    backward would run them again."""
    kinds = [what for attr, what in _GLOBAL_HOOKS
             if any(not _torch_tracker(h) for h in (getattr(_module_globals, attr, None) or {}).values())]
    return f"global module {' and '.join(kinds)} are registered" if kinds else None


def stock_reason(m: nn.Module, cls: type) -> str | None:
    """None when ``m`` runs ``cls.forward`` (``cls`` itself, or a subclass that keeps its forward,
    e.g. a parametrized module) and has no hooks; else why not."""
    if not isinstance(m, cls):
        return f"is a {type(m).__name__}, not a {cls.__name__}"
    if type(m).forward is not cls.forward:
        return f"is a {type(m).__name__} with its own forward"
    return hook_reason(m)


def layer_norm_reason(m: nn.Module) -> str | None:
    """None for a plain ``nn.LayerNorm`` over the last dimension (its parameters give exactly what
    calling it gives)."""
    reason = stock_reason(m, nn.LayerNorm)
    if reason is None and len(m.normalized_shape) != 1:  # (a plain attribute: fast to read)
        return f"normalises over {len(m.normalized_shape)} dimensions"
    return reason


def linear_reason(m: nn.Module) -> str | None:
    """None for a plain ``nn.Linear`` (its ``weight``/``bias`` give exactly what calling it gives)."""
    return stock_reason(m, nn.Linear)


def mha_reason(m: nn.Module) -> str | None:
    """None for an ``nn.MultiheadAttention`` whose packed in-projection and ``out_proj`` the fast path
    may use in its place: plain, one packed ``in_proj_weight``, no ``bias_k``/``bias_v``, no
    ``add_zero_attn``, seq-first (what the original blocks call it with), and a plain ``out_proj``
    (the module reads ``out_proj.weight`` itself, never calling it, so hooks there would not apply
    in the original either)."""
    reason = stock_reason(m, nn.MultiheadAttention)
    if reason:
        return reason
    if not m._qkv_same_embed_dim or param(m, "in_proj_weight") is None:
        return "has separate q/k/v projection weights (kdim/vdim)"
    if m.bias_k is not None or m.bias_v is not None:
        return "has add_bias_kv"
    if m.add_zero_attn:
        return "has add_zero_attn"
    if m.batch_first:
        return "is batch_first"
    out = linear_reason(m._modules["out_proj"])
    return f"has an out_proj that {out}" if out else None


def fused_linear(m: nn.Module) -> tuple[nn.Linear, tuple | None] | None:
    """How the fused MLP may run the Linear ``m`` without calling it: ``(m, None)`` for a plain
    ``nn.Linear``; ``(base, (A, B, scale))`` for a Linear with one low-rank update, ``m(x) ==
    base(x) + scale * linear(linear(x, A), B)``, which the fused MLP adds itself (see
    :mod:`xclip_fast.lowrank`); None when ``m`` must be called. Low-rank Linears:

    - PEFT's LoRA ``Linear`` (``peft.tuners.lora.layer.Linear``) with one active adapter, not merged,
      plain LoRA (no DoRA or other variant, no ``lora_bias``), its dropout off (rate 0, or in
      evaluation), a plain base layer and no hooks on it or its parts; with its adapters disabled
      (``disable_adapter()``) it is its base layer;
    - a user's module whose class defines ``xclip_fast_low_rank(self) -> (base, A, B, scale)``
      (``base`` an ``nn.Linear``, ``A (r, in_features)``, ``B (out_features, r)``, A and B of one
      floating dtype on the base's device), promising the identity above, with no hooks. A and B in
      another dtype than the base are applied as PEFT applies its adapters (see
      :mod:`xclip_fast.lowrank`); a declaration that breaks these rules is refused with a TypeError.
    """
    if type(m) is nn.Linear or linear_reason(m) is None:
        return (m, None) if hook_reason(m) is None else None
    if hook_reason(m) is not None:
        return None
    declared = getattr(type(m), "xclip_fast_low_rank", None)
    if declared is not None:
        return _declared_low_rank(m)
    if type(m).__name__ != "Linear" or type(m).__module__ != "peft.tuners.lora.layer":
        return None
    return _peft_low_rank(m)


def _declared_low_rank(m: nn.Module):
    base, a, b, scale = m.xclip_fast_low_rank()
    what = f"{type(m).__name__}.xclip_fast_low_rank()"
    if not isinstance(base, nn.Linear) or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) \
            or a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features \
            or b.shape != (base.out_features, a.shape[0]):
        raise TypeError(f"{what} must return (base nn.Linear, A (r, in_features), B (out_features, r), scale)")
    weight = base.weight
    if a.dtype != b.dtype or not a.is_floating_point():
        raise TypeError(f"{what} returned A ({a.dtype}) and B ({b.dtype}): they must share one floating dtype "
                        f"(which may differ from the base's, {weight.dtype})")
    if a.device != weight.device or b.device != weight.device:
        raise TypeError(f"{what} returned A on {a.device} and B on {b.device}: both must be on the base "
                        f"Linear's device ({weight.device}); move the module with .to(device)")
    return ((base, (a, b, float(scale))) if linear_reason(base) is None else None)


def _peft_low_rank(m: nn.Module):
    base = m.base_layer
    if linear_reason(base) is not None or m.merged:
        return None
    if m.disable_adapters:
        return base, None
    names = [n for n in m.active_adapters if n in m.lora_A]
    if len(names) != 1:
        return None
    name = names[0]
    lora_a, lora_b, dropout = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
    if name in (getattr(m, "lora_variant", None) or {}) or (getattr(m, "use_dora", None) or {}).get(name):
        return None
    if linear_reason(lora_a) or linear_reason(lora_b) or lora_a.bias is not None or lora_b.bias is not None:
        return None
    a, b, weight = lora_a.weight, lora_b.weight, base.weight
    if a.dtype != b.dtype or a.device != weight.device or b.device != weight.device or (
            a.dtype != weight.dtype and not getattr(m, "cast_input_dtype_enabled", True)):
        return None  # (what PEFT's module does with these, its own error included, is called)
    if hook_reason(dropout) or not (type(dropout) is nn.Identity or (
            type(dropout) is nn.Dropout and (dropout.p == 0 or not dropout.training))):
        return None
    return base, (param(lora_a, "weight"), param(lora_b, "weight"), float(m.scaling[name]))
