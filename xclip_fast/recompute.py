"""What a layer keeps for its backward: the recompute levels, how each is chosen and run, and the
memory budget.

Levels (:data:`RECOMPUTE_LEVELS`), in d-wide rows per frame token at the released MLP width, the
layer's input aside (every level keeps it):

- ``"none"``: keeps everything its backward uses (11 rows), recomputes nothing;
- ``"lean"``: keeps q/k/v, the attention output and the MLP pre-activation (8 rows); recomputes
  the LayerNorms, the out-projection and QuickGELU (about 2.5% more matmul FLOPs);
- ``"min"``: keeps the MLP pre-activation (4 rows); also recomputes the in-projection and the
  attention (about 11% more);
- ``"block"``: keeps nothing more; also recomputes the MLP's first GEMM (about 22% more).

How. A layer whose parts are *plain* (stock LayerNorms, an in-projection that can be read packed,
a plain out-projection and CLIP's QuickGELU MLP, see :func:`xclip_fast.functional.fused_parts`)
runs its frame path as the hand-written autograd Functions of :mod:`xclip_fast.fused`, which save
exactly what the level keeps and recompute the rest in one Python call in backward: no dispatch
mode, no second Python forward, no module called again. A layer with a wrapped or hooked part (PEFT
LoRA, a hooked LayerNorm, another MLP) runs ``"lean"``/``"min"`` through selective checkpointing
(:func:`selective`: non-reentrant ``torch.utils.checkpoint`` keeping the outputs of the level's
operators), or keeps everything where a recomputation would call a hook again
(:func:`selective_reason`) or the attention drops out; ``"block"`` then checkpoints it whole
(through :func:`checkpointed`).

Every recomputation that reruns Python (those two) goes through :class:`Replay`: it sees the
training flags and ``requires_grad`` of the forward it repeats, and a parameter changed in place in
between is refused, as autograd refuses it for the tensors the Functions save.

Every tensor a level keeps is saved as autograd saves tensors (``save_for_backward``, autograd
itself, the checkpoint's inputs, the selective fallback's kept outputs through :class:`_Keep`), so
saved-tensor hooks active around the forward (activation offloading with
``torch.autograd.graph.save_on_cpu``, compression) see all of it, on every torch release.
PyTorch's own selective checkpointing keeps its cache outside the hooks (until a release routes it
through them), which is why the fallback keeps its outputs itself.

A memory budget (:func:`plan_levels`, from the per-level costs of :func:`level_costs`) assigns
levels to a stack of layers: the fewest recomputed FLOPs whose held bytes stay within a fraction of
what ``"none"`` holds.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from xclip_fast.ops import transforms_active
from xclip_fast.submodules import global_hook_reason, hook_reason

__all__ = ["RECOMPUTE_LEVELS", "check_recompute", "check_budget", "recompute_level", "records_autograd", "Replay",
           "checkpointed", "selective", "selective_reason", "level_costs", "plan_levels"]

RECOMPUTE_LEVELS = ("lean", "min", "none", "block")


def check_recompute(level) -> str:
    """``level`` if it is one of :data:`RECOMPUTE_LEVELS`, else a ``ValueError``."""
    if level not in RECOMPUTE_LEVELS:
        raise ValueError(f"recompute must be one of {RECOMPUTE_LEVELS}, got {level!r}")
    return level


def check_budget(value) -> str | float:
    """A level (see :func:`check_recompute`) or a memory budget: a float in (0, 1], the fraction of
    the ``"none"`` level's held bytes a stack of layers may keep (see :func:`plan_levels`)."""
    if isinstance(value, float) and not isinstance(value, bool):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a recompute budget must be a float in (0, 1], got {value!r}")
        return value
    if value not in RECOMPUTE_LEVELS:
        raise ValueError(f"recompute must be one of {RECOMPUTE_LEVELS} or a budget (a float in (0, 1]), "
                         f"got {value!r}")
    return value


def records_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd records ``module`` on ``x``: grad mode on and ``x`` or a parameter requiring grad."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def recompute_level(level: str, x: torch.Tensor, module: nn.Module) -> str | None:
    """The level that applies to this call of ``module``: None when autograd does not record it
    (inference keeps nothing whatever the level; the plain forward runs), under ``torch.func``
    transforms or forward-mode AD (they run the plain forward too), else ``level``."""
    if transforms_active() or not records_autograd(x, module):
        return None
    return level


# ------------------------------------------------------------------------------------------------
# recomputations that rerun Python: whole-layer checkpointing and the selective fallback
# ------------------------------------------------------------------------------------------------
def _modules(m: nn.Module, out: list) -> list:
    """``m`` and its sub-modules (``Module.modules()`` without its generator machinery: this runs on
    every forward)."""
    out.append(m)
    for child in m._modules.values():
        if child is not None:
            _modules(child, out)
    return out


# a PEFT layer's adapter state (``peft.tuners.tuners_utils.BaseTunerLayer``): the active adapter(s)
# (``set_adapter``) and whether adapters are disabled (``disable_adapter()``); its forward reads these
_ADAPTER_STATE = ("_active_adapter", "_disable_adapters")


class Replay:
    """``fn`` as checkpointing calls it: once in the forward, again (per backward) to recompute.

    The recomputation sees the forward's training flags and ``requires_grad`` of ``module``'s
    sub-modules and parameters, and the adapter state of its PEFT layers (which adapters are active,
    whether they are disabled): ``model.eval()``, ``requires_grad_(False)``, ``set_adapter(...)`` or
    ``with model.disable_adapter():`` between a forward and its backward backpropagate the forward
    that ran. It refuses, naming it, a parameter modified in place since the forward (an optimizer
    step, clipping, an EMA update or merging an adapter before this loss's backward), which it would
    otherwise read with its new values."""

    __slots__ = ("fn", "module", "state")

    def __init__(self, fn: Callable, module: nn.Module):
        self.fn, self.module, self.state = fn, module, None

    def __call__(self, *args, **kwargs):
        if self.state is None:
            modules = _modules(self.module, [])
            params = [(p, p._version, p.requires_grad) for m in modules for p in m._parameters.values()
                      if p is not None]
            adapters = [(m, *(m.__dict__[a] for a in _ADAPTER_STATE)) for m in modules
                        if _ADAPTER_STATE[0] in m.__dict__]
            self.state = (params, [(m, m.training) for m in modules], adapters)
            return self.fn(*args, **kwargs)
        params, modules, adapters = self.state
        changed = [p for p, version, _ in params if p._version != version]
        if changed:
            names = [n for n, p in self.module.named_parameters() if any(p is c for c in changed)]
            raise RuntimeError(
                f"xclip_fast: {', '.join(names)} of a {type(self.module).__name__} was modified in place between its "
                "forward and this backward (an optimizer step, weight clipping or an EMA update before the "
                "backward?); the backward recomputes the layer and would use the new values. Call backward "
                "before changing the parameters, as autograd requires for the original model too.")
        flags = [(m, t) for m, t in modules if m.training != t]
        grads = [(p, r) for p, _, r in params if p.requires_grad != r]
        switched = [(m, state, tuple(m.__dict__[a] for a in _ADAPTER_STATE)) for m, *state in adapters
                    if any(m.__dict__[a] != v for a, v in zip(_ADAPTER_STATE, state))]
        for m, t in flags:
            m.training = t
        for p, r in grads:
            p.requires_grad_(r)
        for m, state, _ in switched:
            m.__dict__.update(zip(_ADAPTER_STATE, state))
        try:
            return self.fn(*args, **kwargs)
        finally:
            for m, t in flags:
                m.training = not t
            for p, r in grads:
                p.requires_grad_(not r)
            for m, _, now in switched:
                m.__dict__.update(zip(_ADAPTER_STATE, now))


def checkpointed(level: str | None, module: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, checkpointed whole (through :class:`Replay`) when ``level`` is
    ``"block"``; as it is otherwise."""
    if level != "block":
        return fn(*args, **kwargs)
    if not torch.compiler.is_compiling():  # (compiled, the partitioner recomputes from the graph)
        fn = Replay(fn, module)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


# outputs kept by the selective fallback at lean and min: the attention (out and log-sum-exp;
# recomputing it costs as much as its forward) and the GEMM outputs of the level's widths
_ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward",
    "xclip_fast::packed_attention_fwd", "xclip_fast::attention_fwd",
})
_GEMMS = frozenset({"aten::mm", "aten::addmm"})


def _keeps(widths: tuple) -> Callable:
    """Whether the selective fallback keeps the output of ``op(*args)``: the attention, and the GEMM
    outputs whose width is in ``widths``. None of them draws random numbers (the fallback does not
    run where the attention drops out), so the recomputation, which starts from the forward's
    generator state, draws the same numbers for the operators it runs again (drop path)."""

    def keeps(op, args) -> bool:
        name = op.name() if hasattr(op, "name") else ""
        return name in _ATTENTION_OPS or (name in _GEMMS and args[-1].shape[-1] in widths)

    return keeps


def _policy(keeps: Callable):
    """``keeps`` as a policy of PyTorch's selective checkpointing (the compiled fallback, where the
    partitioner reads it); random numbers are kept too, as compiled graphs require."""

    def policy(ctx, op, *args, **kwargs):
        if keeps(op, args) or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


class _Kept:
    """The outputs the selective fallback keeps for one forward: recorded while it runs, handed to
    :class:`_Keep` (which saves them for the backward, under the saved-tensor hooks active around the
    forward), given back by it in backward and served to the recomputation in their order.

    ``contexts`` is the pair of contexts ``torch.utils.checkpoint`` runs the forward and the
    recomputation under: two dispatch modes, one recording the kept operators' outputs, the other
    returning them instead of running the operators again. An output written in place later in the
    forward, through any alias of its memory (``result += lora(x)`` on a GEMM's output), is not
    kept: its operator runs again."""

    __slots__ = ("keeps", "records", "tensors", "storages", "served")

    def __init__(self, keeps: Callable):
        self.keeps = keeps
        self.records: list = []  # per kept call: [pytree spec, leaves (None for a tensor), slots, run again]
        self.tensors: list = []  # the kept tensors (detached)
        self.storages: dict = {}  # a kept tensor's storage -> its record
        self.served = 0

    def contexts(self):
        return _Record(self), _Reuse(self)

    def record(self, out) -> None:
        leaves, spec = tree_flatten(out)
        slots = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                slots.append(len(self.tensors))
                self.tensors.append(leaf.detach())
                self.storages[leaf.untyped_storage().data_ptr()] = len(self.records)
            else:
                slots.append(None)
        self.records.append([spec, [None if s is not None else leaf for s, leaf in zip(slots, leaves)], slots,
                             False])

    def written(self, func, args, kwargs) -> None:
        """Marks the record of a kept tensor ``func`` writes into (any alias of its memory)."""
        for a, value in zip(func._schema.arguments, (*args, *[kwargs.get(a.name) for a in
                                                                func._schema.arguments[len(args):]])):
            if a.alias_info is not None and a.alias_info.is_write and isinstance(value, torch.Tensor):
                record = self.storages.get(value.untyped_storage().data_ptr())
                if record is not None:
                    self.records[record][3] = True

    def take(self) -> list:
        """The kept tensors (None for those of a record written in place since its operator ran,
        which then runs again), handed over: this object no longer holds them."""
        tensors, self.tensors, self.storages = self.tensors, [], {}
        for _, _, slots, again in self.records:
            if again:
                for s in slots:
                    if s is not None:
                        tensors[s] = None
        return tensors

    def give_back(self, tensors) -> None:
        self.tensors, self.served = list(tensors), 0

    def serve(self):
        """The next kept call's outputs, or None when its operator must run again."""
        if self.served >= len(self.records) or not self.tensors:
            raise RuntimeError("xclip_fast: the selective fallback's recomputation ran other operators than its "
                               "forward (the layer's code depends on state that changed between them)")
        spec, leaves, slots, again = self.records[self.served]
        self.served += 1
        if again:
            return None
        out = [leaf if s is None else self.tensors[s].detach() for s, leaf in zip(slots, leaves)]
        for s in slots:  # (served once per backward: the recomputed graph holds them from here)
            if s is not None:
                self.tensors[s] = None
        return tree_unflatten(out, spec)


class _Record(TorchDispatchMode):
    """The forward of the selective fallback: records the outputs ``kept.keeps`` names, and which
    of them an operator writes into afterwards."""

    def __init__(self, kept: _Kept):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.kept.storages and func._schema.is_mutable:
            self.kept.written(func, args, kwargs)
        if self.kept.keeps(func, args):
            self.kept.record(out)
        return out


class _Reuse(TorchDispatchMode):
    """The recomputation of the selective fallback: the kept operators return what they returned in
    the forward instead of running again."""

    def __init__(self, kept: _Kept):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.kept.keeps(func, args):
            out = self.kept.serve()
            if out is not None:
                return out
        return func(*args, **(kwargs or {}))


class _Keep(torch.autograd.Function):
    """The identity on a layer's outputs that saves the selective fallback's kept tensors for the
    backward, where autograd saves every tensor: under the saved-tensor hooks active around the
    forward (offloading, compression), as plain autograd and the fused Functions save theirs. Its
    backward, which autograd runs before the layer's (its outputs are the layer's), gives them back
    for the recomputation."""

    @staticmethod
    def forward(ctx, kept, n, *args):
        ctx.kept = kept
        ctx.save_for_backward(*args[n:])
        return args[:n]

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        ctx.kept.give_back(ctx.saved_tensors)
        return (None, None, *grads, *(None,) * len(ctx.saved_tensors))


def selective_reason(module: nn.Module) -> str | None:
    """Why the selective fallback cannot recompute ``module`` (a recomputation would call a hook
    again: on a sub-module, or registered globally), or None."""
    for m in module.modules():
        if m is not module and hook_reason(m):
            return "a sub-module has hooks"
    return global_hook_reason()


def selective(level: str, module: nn.Module, body: Callable, *args, d: int, hidden: int | None):
    """``body(*args)`` (a tuple of tensors) recomputed selectively, the fallback of ``"lean"``
    (keeping the attention, the in-projection output of width ``3 * d`` and the MLP pre-activation
    of width ``hidden``) and ``"min"`` (the attention and the in-projection output) for layers with
    a wrapped part: non-reentrant ``torch.utils.checkpoint`` of ``body`` through :class:`Replay`,
    with the kept outputs saved as autograd saves tensors (:class:`_Keep`: the saved-tensor hooks
    around the forward see them, on every torch release) and served to the recomputation. ``body``
    must end with the MLP's second GEMM, so that the recomputation stops before it. Backpropagates
    any number of times (``retain_graph``). Compiled, PyTorch's selective checkpointing marks the
    same outputs for the partitioner."""
    widths = (3 * d, hidden) if level == "lean" else (3 * d,)
    keeps = _keeps(widths)
    if torch.compiler.is_compiling():
        context = functools.partial(create_selective_checkpoint_contexts, _policy(keeps))
        return checkpoint(body, *args, use_reentrant=False, context_fn=context)
    kept = _Kept(keeps)
    outs = checkpoint(Replay(body, module), *args, use_reentrant=False, context_fn=kept.contexts)
    return _Keep.apply(kept, len(outs), *outs, *kept.take())


# ------------------------------------------------------------------------------------------------
# the memory budget
# ------------------------------------------------------------------------------------------------
def level_costs(d: int, hidden: int, tokens: int, frames: int, residual_bytes: int, gemm_bytes: int,
                copy_bytes: int = 0, seq: int | None = None) -> dict[str, tuple[float, float]]:
    """``{level: (held bytes, recomputed matmul FLOPs)}`` of one plain layer at every level, as
    :class:`xclip_fast.fused.FusedLayer` runs it: ``tokens`` rows (``seq`` per attention, default
    ``tokens // frames``) over ``frames`` frames with one message token each (0: no message path,
    the MIT). Held: what the Functions keep, the layer's input included (every level keeps it), and
    the message path's few rows per frame (kept plainly at every level). FLOPs: the GEMMs and the
    attention its backward repeats. ``residual_bytes``/``gemm_bytes``: element sizes of the residual
    stream and of GEMM outputs; ``copy_bytes``: of the weights' autocast copies (0: none), which the
    levels but ``"block"`` keep for the backward."""
    seq = seq or tokens // max(frames, 1)
    row_r, row_g = tokens * d * residual_bytes, tokens * d * gemm_bytes
    message = frames * d * (4 * residual_bytes + 6 * gemm_bytes)  # message_fc/LN/q,k,v/out per frame
    # the autocast copies: in-projection, out-projection, MLP ("block" recasts them in backward); the
    # message path's (message_fc, the message attention's in- and out-projection, the message token's
    # key/value projection), kept at every level
    weights = (4 * d * d + 2 * d * hidden) * copy_bytes
    message += 7 * d * d * copy_bytes * (frames > 0)
    gemm = 2 * tokens * d * d  # FLOPs of one d x d GEMM over the tokens
    attention = 4 * tokens * (seq + (frames > 0)) * d  # QK^T and PV, the message token as one more key
    ratio = hidden / d
    return {  # rows: the input x and x1 (residual stream); ln_1(x), q/k/v, o, ln_2(x1), the pre-activation
        "none": (row_r * 2 + row_g * (6 + ratio) + message + weights, 0.0),
        "lean": (row_r + row_g * (4 + ratio) + message + weights, gemm),
        "min": (row_r + row_g * ratio + message + weights, gemm * 4 + attention),
        "block": (row_r + message, gemm * (4 + ratio) + attention),  # the recompute stops before fc2
    }


def plan_levels(costs: list[dict[str, tuple[float, float]]], budget: float, fixed: float = 0.0) -> list[str]:
    """Levels for a stack of layers (``costs[i]`` from :func:`level_costs`) that recompute the fewest
    FLOPs while the model holds at most ``budget`` times what it holds with every layer at
    ``"none"``, ``fixed`` being what it holds outside the layers whatever their levels (an
    encoder's patch embedding); the most frugal assignment (every layer ``"block"``) when even that
    is over the budget. Layers of one shape are interchangeable, so the search runs over how many
    layers of each shape take each level (the earliest layers take the most frugal levels)."""
    limit = budget * (sum(c["none"][0] for c in costs) + fixed) - fixed
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(costs):
        groups.setdefault(tuple(sorted(c.items())), []).append(i)
    options = []  # per group: (held, flops, levels in layer order) for every split of its layers
    order = ("none", "lean", "min", "block")
    for key, layers in groups.items():
        cost = dict(key)
        n = len(layers)
        splits = []
        for counts in itertools.product(range(n + 1), repeat=3):
            if sum(counts) > n:
                continue
            counts = (*counts, n - sum(counts))
            held = sum(k * cost[lv][0] for k, lv in zip(counts, order))
            flops = sum(k * cost[lv][1] for k, lv in zip(counts, order))
            # the most frugal levels on the earliest layers
            levels = [lv for k, lv in zip(reversed(counts), reversed(order)) for _ in range(k)]
            splits.append((held, flops, levels))
        options.append((layers, _pareto(splits)))
    best = None
    for choice in itertools.product(*(opts for _, opts in options)):
        held = sum(c[0] for c in choice)
        flops = sum(c[1] for c in choice)
        if held <= limit * (1 + 1e-9) and (best is None or flops < best[1]):
            best = (held, flops, choice)
    if best is None:
        return ["block"] * len(costs)
    levels = [""] * len(costs)
    for (layers, _), (_, _, lv) in zip(options, best[2]):
        for i, level in zip(layers, lv):
            levels[i] = level
    return levels


def _pareto(splits: list) -> list:
    """The splits no other split beats in both held bytes and FLOPs."""
    splits = sorted(splits, key=lambda s: (s[0], s[1]))
    front, best_flops = [], float("inf")
    for s in splits:
        if s[1] < best_flops:
            front.append(s)
            best_flops = s[1]
    return front
