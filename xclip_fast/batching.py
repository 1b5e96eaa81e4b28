"""The registered operators under ``torch.func``: batching rules, and Functions that reverse-mode
transforms can differentiate.

``vmap``. Every operator of :mod:`xclip_fast.library`, forward and backward, has a batching rule
(``register_vmap``): the vmapped dimension is folded into the operator's own batch dimension (the
sequences of the attention, the elements of QuickGELU), so one launch covers every sample, where
PyTorch would otherwise loop over them in Python, one launch each. An input that is not vmapped is
expanded to the vmapped size first (a copy: the kernels read one batch of sequences). The rules
are the same on every supported release (``torch.library.register_vmap`` exists from torch 2.4).

``grad``, ``vjp``, ``jacrev``. PyTorch builds a registered operator's autograd as a Function
without ``setup_context``, which ``torch.func`` refuses to differentiate. :func:`function_for` makes
the Function it accepts from the same forward operator and the same autograd formula
(``setup_context`` and backward of :mod:`xclip_fast.library`), with ``generate_vmap_rule``: its
forward and backward call the operators, whose batching rules then apply, so per-sample gradients
(``vmap(grad(f))``) run the kernels once per call, not once per sample. The Python API takes this
path whenever a transform is active (:mod:`xclip_fast.ops`).

Not supported by the kernels, and routed to the torch backend by ``backend="auto"`` (refused by
``"triton"``): forward-mode AD (``jvp``, ``jacfwd``, ``hessian``) and nested reverse mode (second-order
gradients: the backward operators are not differentiable).
"""

from __future__ import annotations

import torch

__all__ = ["folded_rule", "elementwise_rule", "function_for", "transformable"]


def _fold(t: torch.Tensor | None, dim: int | None, n: int) -> torch.Tensor | None:
    """``t`` with its vmapped dimension ``dim`` (None: not vmapped, expanded to ``n``) folded into its
    first dimension: ``(n * B, ...)``."""
    if t is None:
        return None
    t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _front(t: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    """``t`` with its vmapped dimension first (None: expanded to ``n``)."""
    return t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)


def _unfold(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.unflatten(0, (n, -1))


def folded_rule(op):
    """The rule of an attention operator, forward or backward: every tensor argument folded into the
    batch of sequences (``None`` and the scale pass through), every output unfolded, except the
    backward's empty ``(0,)`` placeholders for an absent extra token, which are not batched."""

    def rule(info, in_dims, *args):
        n = info.batch_size
        folded = [_fold(a, d, n) if isinstance(a, torch.Tensor) else a for a, d in zip(args, in_dims)]
        outs = op(*folded)
        dims = tuple(None if o.dim() == 1 and o.numel() == 0 else 0 for o in outs)
        return tuple(o if d is None else _unfold(o, n) for o, d in zip(outs, dims)), dims

    return rule


def elementwise_rule(op):
    """An elementwise operator of tensors of one shape (``quick_gelu``, ``quick_gelu_backward``): the
    vmapped dimension is one more dimension of its elements."""

    def rule(info, in_dims, *tensors):
        n = info.batch_size
        return op(*(_front(t, d, n) for t, d in zip(tensors, in_dims))), 0

    return rule


def _no_setup(ctx, inputs, output) -> None:
    pass


def function_for(name: str, op, setup_context, backward) -> type[torch.autograd.Function]:
    """A Function that ``torch.func`` can differentiate: forward ``op``, the operator's own
    ``setup_context`` (None: nothing to keep) and ``backward`` (those given to ``register_autograd``),
    and a vmap rule generated from them (which reaches the operators' batching rules)."""

    def forward(*args):
        return op(*args)

    setup_context = setup_context or _no_setup

    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "__doc__": f"``{op}`` as a Function for torch.func (see {__name__})."})


def transformable(op, backward):
    """``op`` as the operators' autograd formulas call it: directly, or under ``torch.func`` (whose
    ``grad`` runs those formulas with gradient recording on) through its Function, whose ``backward``
    (the refusal of second-order gradients) ``torch.func`` can record."""
    function = function_for(f"{op._name}_function", op, None, backward)

    def call(*args):
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return op(*args)

    return call
