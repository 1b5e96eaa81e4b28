"""Fine-tuning wrappers, hooks and weight transforms on the fast modules: never ignored.

The fast path reads the parameters of a few sub-modules instead of calling them (the packed
in-projection, the two layers of CLIP's MLP) and replaces the attention modules and the drop path
by its own computation. With PEFT LoRA, forward / pre-forward / backward hooks, ``prune``, either
``weight_norm``, a parametrization, a swapped drop path or an attention module with options the
fast path does not model, it must compute exactly what the original computes with the same
wrappers (float64, outputs and every gradient), calling the modules where it cannot read them.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from _helpers import BACKENDS, assert_grads_close, assert_rel, tiny_xclip
from torch import nn
from torch.nn.utils import prune

import xclip_fast
from xclip_fast import reference
from xclip_fast.blocks import CrossFrameAttentionBlock, ResidualAttentionBlock, official_mlp
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.functional import FusedMLP

F64_TOL = 1e-10  # float64 on both sides: rounding only
D, H, T, L, B = 32, 2, 3, 5, 2


class Scale(nn.Module):
    """A parametrization: the weight times 1.5 (read through ``.weight``, exact on the fast path)."""

    def forward(self, w):
        return 1.5 * w


class HalfPath(nn.Module):
    """A user's own drop path (here: halves its branch), which the fast path cannot emulate."""

    def forward(self, x):
        return 0.5 * x


def _lora(targets):
    peft = pytest.importorskip("peft", reason="PEFT is in the test extra (pip install -e '.[test]')")

    def wrap(block):
        return peft.get_peft_model(block, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                          init_lora_weights=False))
    return wrap


def _hook_output(name, factor=1.5):
    def wrap(block):
        def hook(module, args, out):
            return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
        block.get_submodule(name).register_forward_hook(hook)
        return block
    return wrap


def _pre_hook(name):
    def wrap(block):
        block.get_submodule(name).register_forward_pre_hook(lambda m, args: tuple(0.5 * a for a in args))
        return block
    return wrap


def _backward_hook(name):
    def wrap(block):
        block.get_submodule(name).register_full_backward_hook(lambda m, gin, gout: tuple(
            None if g is None else 3.0 * g for g in gin))
        return block
    return wrap


def _prune(name):
    def wrap(block):
        prune.l1_unstructured(block.get_submodule(name), "weight", amount=0.5)
        return block
    return wrap


def _old_weight_norm(name):
    def wrap(block):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
            m = torch.nn.utils.weight_norm(block.get_submodule(name))
        with torch.no_grad():
            m.weight_g.mul_(1.5)  # a magnitude other than the initial weight's (as after training)
        return block
    return wrap


def _new_weight_norm(name):
    def wrap(block):
        m = torch.nn.utils.parametrizations.weight_norm(block.get_submodule(name))
        with torch.no_grad():
            m.parametrizations.weight.original0.mul_(1.5)
        return block
    return wrap


def _parametrize(name, param):
    def wrap(block):
        parametrize.register_parametrization(block.get_submodule(name), param, Scale())
        return block
    return wrap


def _swap(name, make):
    def wrap(block):
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, make(block))
        return block
    return wrap


def _bias_kv_attention(block):
    torch.manual_seed(5)
    return nn.MultiheadAttention(D, H, add_bias_kv=True).double()


# (id, wrapper, the fast path stays fast: no fallback of the attention/drop path)
OFFICIAL_CASES = [
    ("lora-mlp-and-message_fc", _lora(["c_fc", "c_proj", "message_fc"]), True),
    ("lora-attention-modules", _lora(["attn", "message_attn"]), False),
    ("lora-out_proj", _lora(["out_proj"]), False),  # nn.MultiheadAttention reads out_proj.weight itself
    ("forward-hook-c_fc", _hook_output("mlp.c_fc"), True),
    ("forward-hook-mlp", _hook_output("mlp"), True),
    ("forward-hook-gelu", _hook_output("mlp.gelu"), True),
    ("forward-hook-attn", _hook_output("attn"), False),
    ("forward-hook-message_attn", _hook_output("message_attn"), False),
    ("forward-hook-out_proj", _hook_output("attn.out_proj"), False),
    ("forward-hook-ln_1", _hook_output("ln_1"), True),
    ("pre-hook-message_fc", _pre_hook("message_fc"), True),
    ("pre-hook-attn", _pre_hook("attn"), False),
    ("backward-hook-c_proj", _backward_hook("mlp.c_proj"), True),
    ("prune-c_fc", _prune("mlp.c_fc"), True),
    ("old-weight-norm-c_proj", _old_weight_norm("mlp.c_proj"), True),
    ("parametrizations-weight-norm-c_fc", _new_weight_norm("mlp.c_fc"), True),
    ("parametrize-in_proj", _parametrize("attn", "in_proj_weight"), True),
    ("parametrize-c_fc", _parametrize("mlp.c_fc", "weight"), True),
    ("own-drop-path", _swap("drop_path", lambda b: HalfPath()), False),
    ("add_bias_kv-attention", _swap("attn", _bias_kv_attention), False),
]


def _block_pair(wrap, backend, device="cpu"):
    torch.manual_seed(0)
    ref = reference.CrossFramelAttentionBlock(D, H, T=T).double()
    fast = CrossFrameAttentionBlock(D, H, T=T, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    ref = wrap(ref)
    torch.manual_seed(1)
    fast = wrap(fast)
    return ref.to(device), fast.to(device)


def _run(module, x, grad):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y, x.grad, [(n, p.grad) for n, p in module.named_parameters() if p.requires_grad]


def _inner(block):
    return block.base_model.model if hasattr(block, "base_model") else block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, wrap, stays_fast", OFFICIAL_CASES, ids=[c[0] for c in OFFICIAL_CASES])
def test_wrapped_or_hooked_block_equals_the_original(case, wrap, stays_fast, backend, device):
    ref, fast = _block_pair(wrap, backend, device)
    inner = _inner(fast)
    assert (inner.original_reason() is None) == stays_fast, inner.original_reason()
    x = torch.randn(L, B * T, D, dtype=torch.float64, device=device)
    grad = torch.randn_like(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, gx, grads = _run(fast, x, grad)
    said = [str(w.message) for w in caught if "xclip_fast" in str(w.message)]
    assert bool(said) != stays_fast, said  # a fallback says so, the fast path does not
    y_ref, gx_ref, grads_ref = _run(ref, x, grad)
    assert_rel(f"{case}: output", y, y_ref, F64_TOL)
    assert_rel(f"{case}: grad x", gx, gx_ref, F64_TOL)
    assert [n for n, _ in grads] == [n for n, _ in grads_ref]
    assert [g is None for _, g in grads] == [g is None for _, g in grads_ref]
    if any(g is not None for _, g in grads_ref):  # LoRA on out_proj: the original never uses it
        assert_grads_close([n for n, _ in grads], [g for _, g in grads], [g for _, g in grads_ref], F64_TOL)


def test_the_wrappers_change_the_result():
    """The cases above are meaningful: each wrapper changes the original's output (else an ignored
    wrapper would pass them)."""
    x = torch.randn(L, B * T, D, dtype=torch.float64)
    torch.manual_seed(0)
    plain = reference.CrossFramelAttentionBlock(D, H, T=T).double()
    y = plain(x)
    for case, wrap, _ in OFFICIAL_CASES:
        if case in ("lora-out_proj", "forward-hook-out_proj", "backward-hook-c_proj"):
            continue  # ignored by the original itself / changes gradients only
        torch.manual_seed(1)
        wrapped = wrap(copy.deepcopy(plain))
        assert (wrapped(x) - y).abs().max() > 1e-3, f"{case} does not change the output"


def test_parametrized_and_plain_mlps_stay_fused():
    mlp = reference.clip_mlp(8)
    assert isinstance(official_mlp(mlp), FusedMLP)
    parametrize.register_parametrization(mlp.c_fc, "weight", Scale())
    assert isinstance(official_mlp(mlp), FusedMLP)  # .weight reads through the parametrization
    mlp.c_proj.register_forward_hook(lambda m, a, o: o)
    assert official_mlp(mlp) is mlp  # hooked: called as a module


def test_pruned_block_trains_for_several_steps():
    """prune recomputes the weight in a pre-forward hook: the fast path used to keep the stale
    weight of the first call (and its already-freed graph: the second backward failed)."""
    ref, fast = _block_pair(_prune("mlp.c_fc"), "torch")
    opt_r = torch.optim.SGD(ref.parameters(), lr=1e-2)
    opt_f = torch.optim.SGD(fast.parameters(), lr=1e-2)
    x = torch.randn(L, B * T, D, dtype=torch.float64)
    for _ in range(3):
        for m, opt in ((ref, opt_r), (fast, opt_f)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert_rel("after three steps", fast(x), ref(x), F64_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mit_block_with_hooked_attention(backend, device):
    torch.manual_seed(0)
    ref = reference.ResidualAttentionBlock(D, H).to(device, torch.float64)
    fast = ResidualAttentionBlock(D, H, backend=backend).to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):
        m.attn.register_forward_hook(lambda mod, a, out: (2 * out[0], out[1]))
        m.mlp.c_fc.register_forward_hook(lambda mod, a, out: out - 1)
    x = torch.randn(T, B, D, dtype=torch.float64, device=device)
    with pytest.warns(UserWarning, match="attn has forward hooks"):
        y = fast(x)
    assert_rel("MIT block", y, ref(x), F64_TOL)


# ------------------------------------------------------------------------------------------------
# the encoder: hooks on blocks under chunk_frames, hooks on containers it does not call
# ------------------------------------------------------------------------------------------------
def _encoder():
    torch.manual_seed(0)
    return XCLIPVideoEncoder(input_resolution=16, patch_size=8, width=32, layers=2, heads=2, embed_dim=16,
                             num_frames=3, mit_heads=2, backend="torch").double().eval()


def test_hooked_blocks_run_whole_under_chunk_frames():
    enc = _encoder()
    seen = []
    enc.visual.blocks[1].register_forward_hook(lambda m, args, out: seen.append(out.shape) or out * 0.5)
    video = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        chunked = enc(video, chunk_frames=2)
        whole = enc(video)
    assert seen == [torch.Size([5, 6, 32])] * 2, "the hook did not see the block's whole output"
    assert_rel("chunked with a hooked block", chunked, whole, F64_TOL)
    enc.visual.blocks[1]._forward_hooks.clear()
    with torch.no_grad():
        assert (enc(video) - whole).abs().max() > 1e-6  # the hook mattered


def test_hooks_on_containers_the_encoder_does_not_call_are_refused():
    enc = _encoder()
    video = torch.randn(1, 3, 3, 16, 16, dtype=torch.float64)
    enc.visual.register_forward_hook(lambda m, a, o: o)
    with pytest.raises(ValueError, match="visual has forward hooks, which would not run"):
        enc(video)
    enc = _encoder()
    enc.visual.transformer.resblocks.register_forward_pre_hook(lambda m, a: a)
    with pytest.raises(ValueError, match="resblocks has forward pre-hooks, which would not run"):
        enc(video)


# ------------------------------------------------------------------------------------------------
# Hugging Face: PEFT LoRA, hooks, output_attentions, save_pretrained
# ------------------------------------------------------------------------------------------------
HF_CASES = [
    ("lora-q-v-fc1", _lora(["q_proj", "v_proj", "fc1"]), True),
    ("lora-everything", _lora(["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "message_fc"]), True),
    ("hook-q_proj", _hook_output("vision_model.encoder.layers.0.self_attn.q_proj"), True),
    ("hook-k_proj-message", _hook_output("vision_model.encoder.layers.1.message_attn.k_proj"), True),
    ("hook-self_attn", _hook_output("vision_model.encoder.layers.0.self_attn"), False),
    ("hook-mit-self_attn", _hook_output("mit.encoder.layers.0.self_attn"), False),
    ("hook-mlp", _hook_output("vision_model.encoder.layers.1.mlp"), True),
    ("prune-fc1", _prune("vision_model.encoder.layers.0.mlp.fc1"), True),
    ("parametrize-v_proj", _parametrize("vision_model.encoder.layers.0.self_attn.v_proj", "weight"), True),
]


def _hf_pair(wrap, backend, patch_after=True, device="cpu"):
    original = tiny_xclip(torch.float64, attn_implementation="sdpa")
    other = copy.deepcopy(original)
    if not patch_after:
        xclip_fast.patch_xclip(other, backend=backend)
    torch.manual_seed(1)
    original = wrap(original)
    torch.manual_seed(1)
    other = wrap(other)
    if patch_after:
        xclip_fast.patch_xclip(other, backend=backend)
    return original.to(device), other.to(device)


def _model(m):
    return m.get_base_model() if hasattr(m, "get_base_model") else m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, wrap, stays_fast", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_wrapped_or_hooked_hf_model_equals_the_unpatched_one(case, wrap, stays_fast, backend, device):
    original, patched = _hf_pair(wrap, backend, patch_after=case != "lora-q-v-fc1", device=device)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _model(patched).get_video_features(pixel_values=video).pooler_output
    assert bool([w for w in caught if "xclip_fast" in str(w.message)]) != stays_fast
    want = _model(original).get_video_features(pixel_values=video).pooler_output
    assert (want - _model(tiny_xclip(torch.float64).to(device)).get_video_features(pixel_values=video).pooler_output
            ).abs().max() > 1e-6, "the wrapper changes nothing: the case is void"
    assert_rel(f"{case}: video features", got, want, F64_TOL)
    weights = torch.randn_like(want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    named = [(n, p) for n, p in patched.named_parameters() if p.requires_grad]
    named_ref = dict((n, p) for n, p in original.named_parameters() if p.requires_grad)
    assert [n for n, _ in named] == list(named_ref)
    used = [(n, p.grad, named_ref[n].grad) for n, p in named if named_ref[n].grad is not None]
    assert used, "no gradient reached the trained parameters"
    assert_grads_close([u[0] for u in used], [u[1] for u in used], [u[2] for u in used], F64_TOL)


def test_patch_xclip_takes_a_peft_model():
    peft = pytest.importorskip("peft", reason="PEFT is in the test extra")
    model = peft.get_peft_model(tiny_xclip(torch.float64), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert xclip_fast.patch_xclip(model, backend="torch") is model
    assert xclip_fast.hf.is_patched(model)
    xclip_fast.unpatch_xclip(model)
    assert not xclip_fast.hf.is_patched(model)


@pytest.mark.parametrize("how", ["argument", "config"])
def test_output_attentions_are_returned(how):
    """Attention weights are what people plot: the patched model returns the unpatched model's
    (the layers run their original computation for such calls)."""
    original = tiny_xclip(torch.float64, attn_implementation="eager")
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="torch")
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(0, 99, (2, 6))
    kwargs = {"output_attentions": True} if how == "argument" else {}
    if how == "config":
        for m in (original, patched):
            m.config.output_attentions = m.config.vision_config.output_attentions = True
            m.vision_model.config.output_attentions = True
    with torch.no_grad():
        want = original.get_video_features(pixel_values=video, **kwargs)
        got = patched.get_video_features(pixel_values=video, **kwargs)
        full_want = original(input_ids=ids, pixel_values=video, **kwargs).vision_model_output
        full_got = patched(input_ids=ids, pixel_values=video, **kwargs).vision_model_output
    for w, g in ((want, got), (full_want, full_got)):
        assert len(w.attentions) == len(g.attentions) == 2, (len(w.attentions), len(g.attentions))
        for i, (a, b) in enumerate(zip(g.attentions, w.attentions)):
            assert_rel(f"attention weights of layer {i}", a, b, F64_TOL)
    # transformers' eager attention takes its softmax in float32 (an fp32-accurate oracle); the MIT,
    # whose attentions are not returned, runs the fast path
    assert_rel("features", got.pooler_output, want.pooler_output, 1e-5)
    with torch.no_grad():  # and the calls that do not ask run the fast path again
        plain = patched.get_video_features(pixel_values=video, output_attentions=False)
    assert plain.attentions in (None, ())


def test_transformers_collector_is_where_the_patch_reads_it():
    """``output_attentions`` set in a config reaches the layers only through transformers' private
    output collector, which the patched layers read to know when to run the original computation.
    If transformers moves or renames it, this fails (and the layers warn at run time)."""
    from transformers.utils import output_capturing

    collector = output_capturing._active_collector
    assert callable(getattr(collector, "get", None)) and hasattr(collector, "global_var")


def test_save_pretrained_names_the_original_class(tmp_path):
    import json

    from transformers import XCLIPModel

    model = xclip_fast.patch_xclip(tiny_xclip(torch.float32), backend="torch")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["XCLIPModel"]
    loaded = XCLIPModel.from_pretrained(tmp_path)
    assert type(loaded) is XCLIPModel
    video = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        assert_rel("reloaded", loaded.get_video_features(pixel_values=video).pooler_output,
                   model.get_video_features(pixel_values=video).pooler_output, 1e-5)
