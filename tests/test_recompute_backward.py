"""What the backward of a recompute level sees, at every level, against the original block doing
the same: attention dropout, a second backward through one graph (retain_graph, two losses on one
output, also through the selective fallback), a parameter changed in place between forward and
backward (refused as autograd refuses it), ``eval()`` or ``requires_grad_(False)`` between them
(the forward that ran is backpropagated), module hooks (called once per forward unless the whole
block is checkpointed), Hugging Face's ``enable_input_require_grads`` with gradient checkpointing,
and the aten operators one block step issues (the host's work on a GPU)."""

import warnings

import pytest
import torch
from _helpers import assert_grads_close, assert_rel, tiny_xclip
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import xclip_fast
from xclip_fast import reference
from xclip_fast.blocks import CrossFrameAttentionBlock
from xclip_fast.recompute import RECOMPUTE_LEVELS

LEVELS = list(RECOMPUTE_LEVELS)
EXACT = 1e-10  # float64 on both sides: only the order of a few sums differs
L, B, T, D, H = 5, 2, 2, 32, 2


class LowRank(nn.Module):
    """A LoRA-like wrapper (``base(x) + up(down(x))``): the block cannot read it as a plain Linear."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.out_features = base, base.out_features
        self.down = nn.Linear(base.in_features, 2, bias=False, dtype=base.weight.dtype)
        self.up = nn.Linear(2, base.out_features, bias=False, dtype=base.weight.dtype)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _pair(level, droppath=0.0, wrapped=False):
    """The original block and a fast one with its weights, float64, training mode; ``wrapped``: both
    MLPs' first layer wrapped (the fast block then takes the selective fallback at lean/min)."""
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(D, H, None, droppath, T).double().train()
    fast = CrossFrameAttentionBlock(D, H, None, droppath, T, backend="torch", recompute=level).double().train()
    fast.load_state_dict(ref.state_dict())
    if wrapped:
        ref.mlp.c_fc = LowRank(ref.mlp.c_fc)
        fast.mlp.c_fc = LowRank(fast.mlp.c_fc)
        fast.mlp.c_fc.load_state_dict(ref.mlp.c_fc.state_dict())
    return ref, fast


def _x():
    return torch.randn(L, B * T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def _names(module):
    return ["x"] + [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_attention_dropout_at_every_level(level, backend):
    """Attention dropout (both attentions) in training runs at every level and computes what the
    level "none" computes from the same random numbers. (The original draws its dropout for l+1
    query rows, the fast block for the l it keeps, so only the levels are compared with each other.)"""
    outs = {}
    for lv in ("none", level):
        _, fast = _pair(lv, droppath=0.2)
        fast.backend = backend
        fast.attn.dropout = fast.message_attn.dropout = 0.3
        x = _x().requires_grad_()
        torch.manual_seed(5)
        y = fast(x)
        y.backward(torch.ones_like(y))
        outs[lv] = (y.detach(), _grads(fast, x))
        if lv == level:
            fast.attn.dropout = fast.message_attn.dropout = 0.0
            torch.manual_seed(5)
            assert (fast(x) - y).abs().max() > 1e-3, "attention dropout dropped nothing: the test shows nothing"
    assert_rel("output", outs[level][0], outs["none"][0], EXACT)
    assert_grads_close(_names(fast), outs[level][1], outs["none"][1], EXACT)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("level", LEVELS)
def test_second_backward_through_one_graph(level, wrapped):
    """retain_graph=True and then a second loss on the same output, as the original allows; also
    through the selective fallback of a block with a wrapped part (its kept outputs are served to
    every recomputation, not once)."""
    ref, fast = _pair(level, droppath=0.2, wrapped=wrapped)
    results = []
    for m in (ref, fast):
        x = _x().requires_grad_()
        torch.manual_seed(3)
        y = m(x)
        y.sum().backward(retain_graph=True)
        y.square().sum().backward()
        results.append(_grads(m, x))
    assert_grads_close(_names(fast), results[1], results[0], EXACT)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("level", LEVELS)
def test_parameter_changed_in_place_before_backward_is_refused(level, wrapped):
    """An optimizer step or an EMA update between a forward and its backward: the original refuses
    it (autograd's version check); so does every level, for plain blocks and the selective fallback
    (the levels that rerun Python would otherwise read the new values)."""
    ref, fast = _pair(level, wrapped=wrapped)
    for m in (ref, fast):
        y = m(_x().requires_grad_())
        weight = m.mlp.c_fc.down.weight if wrapped else m.mlp.c_fc.weight
        with torch.no_grad():
            weight.mul_(1.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
            y.sum().backward()


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("level", LEVELS)
def test_eval_or_frozen_between_forward_and_backward(level, wrapped):
    """``eval()`` between a training forward (drop path on) and its backward, then
    ``requires_grad_(False)``: the backward of the forward that ran, as in the original (frozen
    parameters get no gradient)."""
    for change in ("eval", "freeze"):
        ref, fast = _pair(level, droppath=0.3, wrapped=wrapped)
        results = []
        for m in (ref, fast):
            x = _x().requires_grad_()
            torch.manual_seed(4)
            y = m(x)
            m.eval() if change == "eval" else m.requires_grad_(False)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), _grads(m, x)))
        assert_rel("output", results[1][0], results[0][0], EXACT)
        if change == "freeze":
            assert all(g is None for g in results[1][1][1:]), "frozen parameters got gradients"
        assert_grads_close(_names(fast), results[1][1], results[0][1], EXACT)


def _hook_calls(fast, x):
    """Module calls seen by a global forward hook during the forward, then during the backward."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    try:
        y = fast(x)
        forward = len(calls)
        y.sum().backward()
    finally:
        handle.remove()
    return forward, len(calls) - forward


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("level", LEVELS)
def test_global_module_hooks_run_once_unless_the_block_is_checkpointed_whole(level, wrapped):
    """A global module hook (``register_module_forward_hook``) sees each module call of the forward
    once: no level calls a module in backward (the selective fallback keeps everything instead),
    but "block" on a block with a wrapped part, which is checkpointed whole and runs its forward
    again (docs/training.md says so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, fast = _pair(level, wrapped=wrapped)
        forward, backward = _hook_calls(fast, _x().requires_grad_())
    assert forward > 0
    if level == "block" and wrapped:
        assert backward > 0, "a wrapped block at 'block' is checkpointed whole: its hooks run again"
    else:
        assert backward == 0, f"{backward} module calls in backward at recompute={level!r}"


@pytest.mark.parametrize("level", LEVELS)
def test_hf_input_require_grads_with_gradient_checkpointing(level):
    """transformers' own check, on a patched model at every level: a step, then
    ``gradient_checkpointing_enable()`` and ``enable_input_require_grads()`` and another step, with
    attention dropout on (X-CLIP's test configuration); without dropout the gradients equal the
    unpatched model's under the same checkpointing."""
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    for dropout in (0.1, 0.0):
        grads = []
        for patched in (False, True):
            model = tiny_xclip(torch.float64, attention_dropout=dropout, attn_implementation="sdpa").train()
            if patched:
                xclip_fast.patch_xclip(model, backend="torch", recompute=level)
            model(input_ids=ids, pixel_values=video, return_loss=True).loss.backward()
            model.zero_grad(set_to_none=True)
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
            model(input_ids=ids, pixel_values=video, return_loss=True).loss.backward()
            g = model.vision_model.embeddings.patch_embedding.weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
            grads.append([p.grad for p in model.parameters()])
        if dropout == 0.0:
            names = [n for n, _ in model.named_parameters()]
            assert_grads_close(names, grads[1], grads[0], EXACT)


# ------------------------------------------------------------------------------------------------
# the host's work: aten operators per block step
# ------------------------------------------------------------------------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that run, views excepted (they move no data)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(module, x) -> int:
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        y = module(x)
        y.backward(torch.ones_like(y))

    step()  # (first calls may initialise things)
    counter = _OpCounter()
    with counter:
        step()
    return counter.count


def test_aten_operators_per_block_step():
    """One block forward + backward (torch backend, float32, gradients set to None before, as
    ``zero_grad`` does): "none" and "lean" issue no more aten operators than the original block,
    "min" a few more (it repeats a GEMM), "block" at most 1.3x (it reruns the forward). Counts
    are exact (no timing): the host time they cost is measured by the benchmark."""
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(64, 2, None, 0.0, 2).train()
    fast = CrossFrameAttentionBlock(64, 2, None, 0.0, 2, backend="torch").train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 64, requires_grad=True)
    original = _ops_per_step(ref, x)
    counts = {}
    for level in LEVELS:
        fast.recompute = level
        counts[level] = _ops_per_step(fast, x)
    assert counts["none"] <= original and counts["lean"] <= original, (original, counts)
    assert counts["min"] <= original + 4 and counts["block"] <= 1.3 * original, (original, counts)
