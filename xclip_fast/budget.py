"""The encoder's memory budget: each block's recompute level from a fraction of what ``"none"`` holds.

:class:`BudgetMixin` gives :class:`xclip_fast.encoder.XCLIPVideoEncoder` ``plan_budget`` (the
levels for given frames and element sizes, from the analytic per-level costs of
:func:`xclip_fast.recompute.level_costs`, chosen by :func:`xclip_fast.recompute.plan_levels`) and
the per-call planning of its forward (its input's frames, autocast's dtypes).
"""

from __future__ import annotations

import torch
from torch import nn

from xclip_fast.blocks import official_mlp
from xclip_fast.mlp import mlp_width
from xclip_fast.ops import autocast_dtype
from xclip_fast.recompute import level_costs, plan_levels, records_autograd

__all__ = ["BudgetMixin"]


def _layer_costs(block: nn.Module, tokens: int, frames: int, sizes: tuple, seq: int) -> dict:
    """:func:`xclip_fast.recompute.level_costs` of a fast block (``tokens`` rows, ``frames``
    message tokens, attention over ``seq``; ``sizes``: its element sizes)."""
    d = block.ln_1.normalized_shape[0]
    hidden = mlp_width(official_mlp(block.mlp)) or 4 * d
    return level_costs(d, hidden, tokens, frames, *sizes, seq=seq)



class BudgetMixin:
    """``recompute=<budget>`` on a module with ``visual`` (the CCT) and ``mit``: the planner."""

    takes_budget = True

    def plan_budget(self, frames: int | None = None, sizes: tuple[int, int, int] | None = None) -> list[str]:
        """Give each block (CCT, then MIT) its level under the memory budget ``self.recompute`` and
        return them: the assignment that recomputes the fewest matmul FLOPs while the encoder holds
        at most the budget times what it holds with every block at ``"none"``
        (:func:`xclip_fast.recompute.plan_levels`, from the analytic per-level costs of
        :func:`xclip_fast.recompute.level_costs`; every block ``"block"`` when even that is over it).
        ``frames``: frames in the batch; ``sizes``: element sizes of the residual stream, of the GEMM
        outputs and of the weights' autocast copies (0 without autocast). Each forward plans for its
        own input and autocast; by default, those of the last forward that planned (else
        ``num_frames`` frames in the weights' dtype), each of the two on its own. Plans are cached
        per budget, frames and sizes. A ``ValueError`` for frames that are not an int >= 1 or sizes
        that are not three ints (the first two >= 1), before anything changes."""
        budget = self._recompute
        if isinstance(budget, str):
            raise ValueError(f"plan_budget needs a budget (recompute is {budget!r})")
        size = self.visual.conv1.weight.element_size()
        last_frames, last_sizes = self.__dict__.get("_budget_input", (self.visual.T, (size, size, 0)))
        frames = last_frames if frames is None else frames
        sizes = last_sizes if sizes is None else sizes
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"plan_budget: frames must be an int >= 1 (frames in the batch), got {frames!r}")
        if not isinstance(sizes, (tuple, list)) or len(sizes) != 3 or not all(
                isinstance(n, int) and not isinstance(n, bool) for n in sizes) or min(sizes[:2]) < 1 or sizes[2] < 0:
            raise ValueError("plan_budget: sizes must be three ints, the element sizes in bytes of the residual "
                             "stream and of the GEMM outputs (>= 1) and of the weights' autocast copies (0 without "
                             f"autocast), e.g. (2, 2, 0) in bf16; got {sizes!r}")
        sizes = tuple(sizes)
        l = self.visual.positional_embedding.shape[0]
        layers = [(b, l * frames, frames, l) for b in self.visual.blocks]
        layers += [(b, frames, 0, self.visual.T) for b in self.mit.resblocks]
        key = (budget, frames, sizes, len(layers))
        plans = self.__dict__.setdefault("_budget_plans", {})
        if key not in plans:
            costs = [_layer_costs(b, tokens, n, sizes, seq) for b, tokens, n, seq in layers]
            # what the encoder keeps outside its blocks whatever their levels: two rows per frame token
            # of the patch embedding, and under autocast the frames' and the weights' copies
            conv = self.visual.conv1.weight
            fixed = 2 * l * frames * conv.shape[0] * sizes[0]
            if sizes[0] != conv.element_size() or sizes[2]:
                fixed += frames * 3 * self.visual.input_resolution ** 2 * sizes[1]
                fixed += (conv.numel() + self.visual.proj.numel()) * sizes[2]
            plans[key] = plan_levels(costs, budget, fixed)
        for (block, *_), level in zip(layers, plans[key]):
            block._recompute = level
        return plans[key]

    def _apply_budget(self, x: torch.Tensor) -> None:
        """Under a budget, the levels for this call: its frames and dtypes (``x``: the embedded
        tokens, the residual stream; autocast's dtype and weight copies). Not while ``torch.compile``
        traces: the graph takes the levels the blocks have (planned when the budget was set, or by
        the last eager call)."""
        if torch.compiler.is_compiling():
            return
        if not isinstance(self._recompute, str) and records_autograd(x, self):
            cast = autocast_dtype(x.device)
            if cast is None or x.dtype == torch.float64:
                sizes = (x.element_size(), x.element_size(), 0)
            else:
                weights = self.visual.conv1.weight.dtype
                sizes = (x.element_size(), cast.itemsize, cast.itemsize if weights != cast else 0)
            self._budget_input = (x.shape[1], sizes)  # (the defaults of later plans: this forward's)
            self.plan_budget(x.shape[1], sizes)

