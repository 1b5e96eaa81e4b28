"""What a training forward keeps for its backward, and what forward + backward cost, on any device.

``held_bytes`` counts the bytes of every tensor storage created during a forward that is still
alive when it returns (the output and pre-existing tensors such as weights and inputs excluded):
what autograd and any checkpoint cache keep for the backward. It follows the operators through a
``TorchDispatchMode``, so it is exact on the CPU too (no allocator statistics needed) and sees the
checkpoint cache that ``saved_tensors_hooks`` cannot see (PyTorch's selective checkpointing keeps
one). It sees eager operators only: a ``torch.compile``-d callable allocates inside its kernels,
where ``saved_bytes`` (the unique storages autograd saves, through ``saved_tensors_hooks``) measures
it instead. ``hooked_bytes`` measures both at once: what the saved-tensor hooks see (what activation
offloading moves) and what is kept outside them (what it cannot reach).

``matmul_flops`` counts forward + backward FLOPs with ``torch.utils.flop_counter.FlopCounterMode``
(matrix products and attention; recomputed products count again). :func:`flop_counter` adds the
attention operators PyTorch's counter does not know: its CPU flash attention (what SDPA runs on
CPU) and the ``xclip_fast`` operators, with PyTorch's own attention formulas (a recomputed
attention counts again, as a recomputed GEMM does).
"""

from __future__ import annotations

import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["StorageTracker", "CollectiveCounter", "held_bytes", "saved_bytes", "hooked_bytes", "CountingOffload",
           "flop_counter", "counting_backend", "matmul_flops", "longest_clip"]


def _key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


class StorageTracker(TorchDispatchMode):
    """Records every storage an operator returns while active; ``live(exclude)`` sums the bytes of
    those still alive."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.dtypes: dict[int, torch.dtype] = {}  # the dtype of the first tensor seen on each storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.storages:
                    self.storages[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.dtypes[ref.cdata] = t.dtype
        return out

    def live(self, exclude=(), dtype: torch.dtype | None = None) -> int:
        """Bytes of the recorded storages still alive, except those of ``exclude``'s tensors; only
        those first seen with ``dtype`` when given."""
        skip = {_key(t) for t in exclude if isinstance(t, torch.Tensor)}
        return sum(n for k, (ref, n) in self.storages.items()
                   if not ref.expired() and k not in skip and (dtype is None or self.dtypes.get(k) == dtype))


def _tensors(*objs):
    """Every tensor in ``objs`` (nested lists, tuples and dicts; a module gives its parameters and buffers)."""
    out = []
    for leaf in tree_leaves(objs, is_leaf=lambda o: isinstance(o, torch.nn.Module)):
        if isinstance(leaf, torch.nn.Module):
            out += list(leaf.parameters()) + list(leaf.buffers())
        elif isinstance(leaf, torch.Tensor):
            out.append(leaf)
    return out


def held_bytes(fn, *args, keep=()) -> tuple[object, int]:
    """``(out, bytes)``: run ``fn(*args)`` and count the bytes it created that are still alive after
    it returns, excluding the output, the arguments and ``keep`` (modules: their parameters and
    buffers; tensors). Keep ``out`` alive while the count matters (its graph holds the bytes)."""
    tracker = StorageTracker()
    with tracker:
        out = fn(*args)
    gc.collect()  # (reference cycles are not kept for the backward: Triton's interpreter leaves some)
    return out, tracker.live(_tensors(out, args, keep))


def saved_bytes(fn, *args, keep=()) -> tuple[object, int]:
    """``(out, bytes)``: the unique storages autograd saves for the backward of ``fn(*args)``
    (through ``saved_tensors_hooks``), excluding those of the arguments and ``keep``. Works for
    compiled callables; a checkpoint inside ``fn`` hides what its own cache keeps."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(_key(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    skip = {_key(t) for t in _tensors(args, keep)}
    return out, sum(n for k, n in seen.items() if k not in skip)


def hooked_bytes(fn, *args, keep=(), copy: bool = False) -> tuple[object, int, int]:
    """``(out, hooked, outside)``: run ``fn(*args)`` under saved-tensor hooks that hold every tensor
    autograd saves (``copy``: a copy of it, made when it is saved, which the backward then reads,
    as offloading's does). ``hooked``: the bytes of the distinct storages the hooks saw (those of
    ``out``, the arguments and ``keep`` excluded, as in :func:`held_bytes`): what activation
    offloading (``torch.autograd.graph.save_on_cpu``) moves. ``outside``: the bytes created during
    the forward that are still alive but reached no hook: kept for the backward where no hook can
    move them. Keep ``out`` alive while the counts matter."""
    packed: list[torch.Tensor] = []
    # a weak reference per storage seen: it keeps the storage's key from being reused by a later
    # one when a copy lets the original go
    hooked: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        hooked.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        packed.append(t.detach().clone() if copy else t)
        return len(packed) - 1

    tracker = StorageTracker()
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, packed.__getitem__):
        out = fn(*args)
    gc.collect()
    skip = _tensors(out, args, keep)
    skipped = {_key(t) for t in skip}
    return out, sum(n for k, (_, n) in hooked.items() if k not in skipped), tracker.live(skip + packed)


class CountingOffload(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu(pin_memory)`` counting what it moves: ``moved`` bytes of
    every tensor it packed (parameters, which it copies too, in ``parameters``)."""

    def __init__(self, pin_memory: bool = False):
        inner = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
        self.moved = self.parameters = 0

        def pack(t):
            n = t.numel() * t.element_size()
            self.moved += n
            if isinstance(t, torch.nn.Parameter):
                self.parameters += n
            return inner.pack_hook(t)

        super().__init__(pack, inner.unpack_hook)


def _attention_formulas() -> dict:
    """FLOP formulas (operator -> f(shapes)) of the attention operators ``FlopCounterMode`` misses."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def heads_first(qkv, extra):  # (B, S, 3, H, D) and the extra token -> q, k, v as (B, H, S, D)
        B, S, _, H, D = qkv
        Sk = S + (extra is not None)
        return (B, H, S, D), (B, H, Sk, D), (B, H, Sk, D)

    def separate(q, k, extra_k):  # q (B, Sq, H, D), k (B, Sk, H, D)
        B, Sq, H, D = q
        Sk = k[1] + (extra_k is not None)
        return (B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D)

    aten = torch.ops.aten
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    ops = torch.ops.xclip_fast
    if hasattr(ops, "packed_attention_fwd"):  # (registered when triton imports)
        formulas.update({
            ops.packed_attention_fwd: lambda qkv, extra, *a, **kw: sdpa_flop_count(*heads_first(qkv, extra)),
            ops.packed_attention_bwd: lambda qkv, extra, out, lse, g, *a, **kw: sdpa_backward_flop_count(
                heads_first(qkv, extra)[0], *heads_first(qkv, extra)),
            ops.attention_fwd: lambda q, k, v, ek, ev, *a, **kw: sdpa_flop_count(*separate(q, k, ek)),
            ops.attention_bwd: lambda q, k, v, ek, ev, out, lse, g, *a, **kw: sdpa_backward_flop_count(
                separate(q, k, ek)[0], *separate(q, k, ek)),
        })
    return formulas


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (not displayed) that also counts the attention operators it misses."""
    return FlopCounterMode(display=False, custom_mapping=_attention_formulas())


def counting_backend(counted: list):
    """A ``torch.compile`` backend that runs the graphs AOTAutograd partitions (the min-cut
    partitioner, which ``activation_memory_budget`` steers) eagerly, adding the FLOPs each graph
    runs (forward, and the backward with what it recomputes) to ``counted[0]``: what a counter
    around a compiled call cannot see. For FLOPs and saved bytes, not for timing."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def compiler(gm, example_inputs):
        def run(args):
            with flop_counter() as counter:
                out = gm(*args)
            counted[0] += counter.get_total_flops()
            return out

        run._boxed_call = True
        return run

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, partition_fn=min_cut_rematerialization_partition)


def matmul_flops(fn, *args) -> int:
    """FLOPs counted by :func:`flop_counter` while ``fn(*args)`` runs (make it run forward and backward)."""
    with flop_counter() as counter:
        fn(*args)
    return counter.get_total_flops()


class CollectiveCounter(TorchDispatchMode):
    """Counts the functional collectives (``_c10d_functional``) that run while active, forward and
    backward: ``calls[name]`` and ``bytes[name]``, the bytes of each call's input tensor (what one
    process puts in: an all-gather's own rows, a reduce-scatter's whole gradient)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name() if hasattr(func, "name") else ""
        op = name.split("::", 1)[-1]
        if name.startswith("_c10d_functional::") and not op.startswith("_") and op != "wait_tensor" and args \
                and isinstance(args[0], torch.Tensor):
            self.calls[op] = self.calls.get(op, 0) + 1
            self.bytes[op] = self.bytes.get(op, 0) + args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def longest_clip(per_frame: float, params: int, capacity: float = 80e9, constant: float = 0.0) -> int:
    """The longest clip (frames) whose training fits in ``capacity`` bytes: ``per_frame`` bytes a
    frame beside ``constant`` bytes and 18 bytes per parameter (fp32 weights and gradients, two
    AdamW states, the bf16 autocast copies). An extrapolation from measured bytes per frame."""
    return int((capacity - 18 * params - constant) // per_frame)
