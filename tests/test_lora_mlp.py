"""LoRA on the MLP keeps the fused MLP: PEFT LoRA (and a user's low-rank wrapper declaring
``xclip_fast_low_rank``) on ``c_fc``/``c_proj`` (official blocks) and ``fc1``/``fc2`` (Hugging Face)
is applied inside the fused path, never by calling the adapter, with gradients for A and B only
when the base is frozen; exact against PEFT's own modules (float64), at every recompute level, in
inference and under autocast; adapters it cannot apply (dropout in training, DoRA, merged) are
called as modules. Holds no more than the block without LoRA."""

import copy

import pytest
import torch
from _helpers import BACKENDS, assert_grads_close, assert_rel, tiny_xclip
from torch import nn

import xclip_fast
from xclip_fast.bench.memory import held_bytes
from xclip_fast.blocks import CrossFrameAttentionBlock, official_mlp
from xclip_fast.functional import FusedMLP
from xclip_fast.testing import rel_err

peft = pytest.importorskip("peft", reason="PEFT is in the test extra (pip install -e '.[test]')")
F64 = 1e-10  # float64 on both sides: the update added in another order, rounding only
D, H, T, L, B = 32, 2, 3, 5, 2
LEVELS = ("lean", "none", "min", "block")


def _lora(module, targets, **config):
    """PEFT LoRA with random A and B (PEFT starts B at zero, which would hide a wrong A gradient)."""
    torch.manual_seed(1)
    return peft.get_peft_model(module, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=False, **config))


class _Calls:
    """Counts calls of PEFT's LoRA ``Linear.forward`` (patched on the class: hooks on the modules
    would make them unplain)."""

    def __init__(self, monkeypatch):
        self.n = 0
        cls = peft.tuners.lora.layer.Linear
        original = cls.forward

        def counted(module, *args, **kwargs):
            self.n += 1
            return original(module, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", counted)


def _block(backend="torch", recompute="lean"):
    torch.manual_seed(0)
    return CrossFrameAttentionBlock(D, H, T=T, backend=backend, recompute=recompute).double().train()


def _step(model, x, grad):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(grad)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)  # (the next step on the same module starts from none)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_official_block_lora_is_fused_and_exact(level, backend, monkeypatch, device):
    fast = _lora(_block(backend, level).to(device), ["c_fc", "c_proj"])
    inner = fast.base_model.model
    assert isinstance(official_mlp(inner.mlp), FusedMLP) and official_mlp(inner.mlp).lora1 is not None
    x, grad = (torch.randn(L, B * T, D, dtype=torch.float64, device=device) for _ in range(2))
    calls = _Calls(monkeypatch)
    y, gx, grads = _step(fast, x, grad)
    assert calls.n == 0, "the fused path called the LoRA modules"
    inner.backend = "reference"  # the original computation, calling PEFT's modules
    y_ref, gx_ref, grads_ref = _step(fast, x, grad)
    assert calls.n == (4 if level == "block" else 2)  # (at "block" the checkpoint calls them again)
    assert sorted(grads) == sorted(grads_ref) and all("lora_" in n for n in grads)  # the base is frozen
    assert_rel("output", y, y_ref, F64)
    assert_rel("grad x", gx, gx_ref, F64)
    assert_grads_close(list(grads), list(grads.values()), [grads_ref[n] for n in grads], F64)


@pytest.mark.parametrize("level", ["lean", "block"])
def test_trainable_base_gets_its_gradients_too(level):
    """PEFT's modules_to_save aside, a user may train the base and the adapter together."""
    fast = _lora(_block("torch", level), ["c_fc", "c_proj"])
    for p in fast.parameters():
        p.requires_grad_(True)
    x, grad = torch.randn(L, B * T, D, dtype=torch.float64), torch.randn(L, B * T, D, dtype=torch.float64)
    _, _, grads = _step(fast, x, grad)
    fast.base_model.model.backend = "reference"
    _, _, grads_ref = _step(fast, x, grad)
    names = [n for n in grads if "mlp" in n]
    assert any("base_layer" in n for n in names)
    assert_grads_close(names, [grads[n] for n in names], [grads_ref[n] for n in names], F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_model_lora_on_fc1_fc2_is_fused_and_exact(backend, monkeypatch, device):
    """Vision layers and the MIT (patched) and the text tower (not patched: PEFT's modules run)."""
    original = _lora(tiny_xclip(torch.float64, attn_implementation="sdpa").to(device).train(), ["fc1", "fc2"])
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend=backend)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64).to(device)
    ids = torch.randint(0, 99, (2, 6)).to(device)
    calls = _Calls(monkeypatch)
    out_p = patched(input_ids=ids, pixel_values=video, return_loss=True)
    text_layers = len(original.base_model.model.text_model.encoder.layers)
    assert calls.n == 2 * text_layers  # only the text tower's adapters were called
    out_o = original(input_ids=ids, pixel_values=video, return_loss=True)
    out_p.loss.backward()
    out_o.loss.backward()
    assert_rel("logits", out_p.logits_per_video, out_o.logits_per_video, F64)
    grads = {n: p.grad for n, p in patched.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in original.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(ref) and all("lora_" in n for n in grads)
    assert_grads_close(list(ref), [grads[n] for n in ref], list(ref.values()), F64)


class LowRankLinear(nn.Module):
    """A user's own LoRA: ``base(x) + scale * B(A(x))``, declaring it for the fused MLP."""

    def __init__(self, base: nn.Linear, r: int = 3, scale: float = 0.7):
        super().__init__()
        self.base, self.scale = base, scale
        self.A = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) / base.in_features**0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, r, dtype=base.weight.dtype) / r**0.5)

    def forward(self, x):
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.A), self.B)

    def xclip_fast_low_rank(self):
        return self.base, self.A, self.B, self.scale


@pytest.mark.parametrize("level", ["lean", "min"])
def test_a_declared_low_rank_wrapper_is_fused_and_exact(level):
    block = _block("torch", level)
    torch.manual_seed(2)
    block.mlp.c_fc = LowRankLinear(block.mlp.c_fc)
    block.mlp.c_proj = LowRankLinear(block.mlp.c_proj, r=2)
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith((".A", ".B")))
    assert official_mlp(block.mlp).lora2 is not None
    x, grad = torch.randn(L, B * T, D, dtype=torch.float64), torch.randn(L, B * T, D, dtype=torch.float64)
    y, gx, grads = _step(block, x, grad)
    block.backend = "reference"
    y_ref, gx_ref, grads_ref = _step(block, x, grad)
    assert sorted(grads) == ["mlp.c_fc.A", "mlp.c_fc.B", "mlp.c_proj.A", "mlp.c_proj.B"]
    assert_rel("output", y, y_ref, F64)
    assert_rel("grad x", gx, gx_ref, F64)
    assert_grads_close(list(grads), list(grads.values()), [grads_ref[n] for n in grads], F64)


def test_a_wrong_declaration_is_refused():
    block = _block()
    wrapper = LowRankLinear(block.mlp.c_fc)
    wrapper.B = nn.Parameter(wrapper.B.t().clone())  # (r, out): the wrong way round
    block.mlp.c_fc = wrapper
    with pytest.raises(TypeError, match="xclip_fast_low_rank"):
        block(torch.randn(L, B * T, D, dtype=torch.float64))


def test_inference_and_autocast():
    """No autograd: the update is added in the inference path. bf16 autocast (float32 model): as
    accurate as PEFT's modules under the same autocast against the float64 truth (at most 2x their
    error, plus 2^-9)."""
    fast = _lora(_block(), ["c_fc", "c_proj"]).eval()
    x = torch.randn(L, B * T, D, dtype=torch.float64)
    inner = fast.base_model.model
    with torch.no_grad():
        y = fast(x)
        inner.backend = "reference"
        y_ref = fast(x)
    assert_rel("inference", y, y_ref, F64)
    fast32 = copy.deepcopy(fast).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_peft = fast32(x.float())
        fast32.base_model.model.backend = "torch"
        y16 = fast32(x.float())
    assert rel_err(y16.double(), y_ref) <= 2 * rel_err(y_peft.double(), y_ref) + 2**-9


@pytest.mark.parametrize("case", ["dropout-training", "dora", "merged", "two-active-adapters"])
def test_adapters_it_cannot_apply_are_called(case, monkeypatch):
    config = dict(lora_dropout=0.1) if case == "dropout-training" else dict(use_dora=True) if case == "dora" else {}
    fast = _lora(_block(), ["c_fc", "c_proj"], **config)
    if case == "merged":
        fast.merge_adapter()
    if case == "two-active-adapters":
        fast.add_adapter("second", peft.LoraConfig(r=2, target_modules=["c_fc", "c_proj"], init_lora_weights=False))
        fast.base_model.set_adapter(["default", "second"])
    assert official_mlp(fast.base_model.model.mlp) is fast.base_model.model.mlp
    x = torch.randn(L, B * T, D, dtype=torch.float64)
    calls = _Calls(monkeypatch)
    torch.manual_seed(3)
    y = fast(x)
    assert calls.n == 2
    fast.base_model.model.backend = "reference"
    torch.manual_seed(3)
    assert_rel(case, y, fast(x), F64)


def test_disabled_adapters_are_the_base():
    fast = _lora(_block(), ["c_fc", "c_proj"])
    x = torch.randn(L, B * T, D, dtype=torch.float64)
    with fast.disable_adapter():
        mlp = official_mlp(fast.base_model.model.mlp)
        assert isinstance(mlp, FusedMLP) and mlp.lora1 is None
        y = fast(x)
        fast.base_model.model.backend = "reference"
        assert_rel("disabled", y, fast(x), F64)


def test_lora_holds_no_more_than_the_block_without_it():
    """Held bytes after the forward at the lean level (nothing rank-wide is kept: x A^T is
    recomputed in backward), against the same block without LoRA, everything trainable."""
    x = torch.randn(8, 2 * T, 64, dtype=torch.float32)

    def held(block):
        return held_bytes(lambda v: block(v).sum(), x, keep=[block])[1]

    torch.manual_seed(0)
    plain = CrossFrameAttentionBlock(64, 2, T=T, recompute="lean").train()
    lora = _lora(copy.deepcopy(plain), ["c_fc", "c_proj"])
    for p in lora.parameters():
        p.requires_grad_(True)
    assert held(lora) <= 1.05 * held(plain), (held(lora), held(plain))


def test_compiled_block_with_lora_equals_eager():
    """torch.compile (one graph: fullgraph) of a PEFT block: the fused path with the update traces."""
    fast = _lora(_block(), ["c_fc", "c_proj"])
    x, grad = torch.randn(L, B * T, D, dtype=torch.float64), torch.randn(L, B * T, D, dtype=torch.float64)
    y, gx, grads = _step(fast, x, grad)
    y_c, gx_c, grads_c = _step(torch.compile(fast, backend="aot_eager", fullgraph=True), x, grad)
    assert_rel("compiled output", y_c, y, F64)
    assert_rel("compiled grad x", gx_c, gx, F64)
    assert_grads_close(list(grads), [grads_c["_orig_mod." + n] if "_orig_mod." + n in grads_c else grads_c[n]
                                     for n in grads], list(grads.values()), F64)


def _mixed_step(model, video):
    """A training step of an X-CLIP model's video tower: its video features and the adapters'
    gradients (float64 copies). The loss is a fixed random weighting of the features (the logits of
    a random tiny model are cosines of nearly parallel embeddings, whose bf16 gradients are mostly
    rounding noise)."""
    y = model.get_video_features(pixel_values=video)
    y = getattr(y, "pooler_output", y)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * weight.to(y.dtype)).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.double(), grads


@pytest.mark.parametrize("model_dtype,adapter_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
@pytest.mark.parametrize("level", LEVELS)
def test_adapters_in_another_dtype_compute_what_peft_computes(level, model_dtype, adapter_dtype, monkeypatch):
    """Adapters whose dtype is not the model's (PEFT keeps them in float32 in a bfloat16 model): the
    update is computed as PEFT computes it (the input cast to the adapters' dtype, the sum cast back).
    Here float64 against float32, so that the comparison is tight: both sides compute the float32 part
    the same way, the rest rounds at float64 (1e-5: float32 rounding of the update, summed in another
    order)."""
    original = _lora(tiny_xclip(model_dtype, attn_implementation="sdpa").train(), ["fc1", "fc2"])
    for n, p in original.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(adapter_dtype)
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="torch", recompute=level)
    video, ids = torch.randn(2, 3, 3, 32, 32, dtype=model_dtype), torch.randint(0, 99, (2, 6))
    calls = _Calls(monkeypatch)
    logits, grads = _mixed_step(patched, video)
    assert calls.n == 0, "the fused path called the LoRA modules"
    logits_ref, ref = _mixed_step(original, video)
    assert sorted(grads) == sorted(ref) and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in patched.parameters())
    assert_rel("features", logits, logits_ref, 1e-5)
    assert_grads_close(list(ref), [grads[n] for n in ref], list(ref.values()), 1e-5)
    with torch.no_grad():
        assert_rel("inference", patched(input_ids=ids, pixel_values=video).logits_per_video,
                   original(input_ids=ids, pixel_values=video).logits_per_video, 1e-5)


@pytest.mark.parametrize("model_dtype,adapter_dtype", [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("level", LEVELS)
def test_peft_default_adapters_in_a_bf16_model(level, model_dtype, adapter_dtype):
    """``from_pretrained(torch_dtype=torch.bfloat16)`` + ``get_peft_model``: PEFT keeps the adapters in
    float32 (``adapter_dtype`` None: as PEFT leaves them); and the converse, a float32 model with bf16
    adapters. Training steps and inference run patched, as accurate as PEFT's own modules against the
    float64 truth (at most 2x their error plus 2^-9: both round at bf16)."""
    original = _lora(tiny_xclip(model_dtype, attn_implementation="sdpa").train(), ["fc1", "fc2"])
    adapters = {n: p for n, p in original.named_parameters() if "lora_" in n}
    if adapter_dtype is not None:
        for p in adapters.values():
            p.data = p.data.to(adapter_dtype)
    assert {p.dtype for p in adapters.values()} == {adapter_dtype or torch.float32}
    truth = copy.deepcopy(original).double()
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="torch", recompute=level)
    torch.manual_seed(4)
    video, ids = torch.randn(2, 3, 3, 32, 32), torch.randint(0, 99, (2, 6))
    logits, grads = _mixed_step(patched, video.to(model_dtype))
    logits_peft, peft_grads = _mixed_step(original, video.to(model_dtype))
    logits_ref, ref = _mixed_step(truth, video.double())
    assert {p.grad for p in patched.parameters() if not p.requires_grad} == {None}
    assert sorted(grads) == sorted(ref) and len(ref) == 12  # 2 vision layers and the MIT's one: fc1, fc2 x A, B
    assert rel_err(logits, logits_ref) <= 2 * rel_err(logits_peft, logits_ref) + 2**-9
    for n in ref:
        assert rel_err(grads[n], ref[n]) <= 2 * rel_err(peft_grads[n], ref[n]) + 2**-9, n
    with torch.no_grad():
        y = patched(input_ids=ids, pixel_values=video.to(model_dtype)).logits_per_video
        y_peft = original(input_ids=ids, pixel_values=video.to(model_dtype)).logits_per_video
    assert y.dtype == y_peft.dtype
    y_ref = truth(input_ids=ids, pixel_values=video.double()).logits_per_video
    assert rel_err(y, y_ref) <= 2 * rel_err(y_peft, y_ref) + 2**-9


@pytest.mark.parametrize("case", ["A-and-B-dtypes", "B-on-meta", "A-not-a-tensor"])
def test_a_declaration_on_another_device_or_dtype_is_refused(case):
    """A user's ``xclip_fast_low_rank()`` returning A and B of two dtypes, on another device than the
    base (a meta tensor: a silently wrong output once), or not tensors: a TypeError naming the method."""
    class AsList(LowRankLinear):
        def xclip_fast_low_rank(self):
            return self.base, self.A.tolist(), self.B, self.scale

    block = _block().eval()
    wrapper = (AsList if case == "A-not-a-tensor" else LowRankLinear)(block.mlp.c_fc)
    if case == "A-and-B-dtypes":
        wrapper.B = nn.Parameter(wrapper.B.float())
    elif case == "B-on-meta":
        wrapper.B = nn.Parameter(wrapper.B.to("meta"))
    block.mlp.c_fc = wrapper
    with pytest.raises(TypeError, match=r"xclip_fast_low_rank\(\)"), torch.no_grad():
        block(torch.randn(L, B * T, D, dtype=torch.float64))


def test_a_declaration_with_adapters_in_another_dtype_is_applied_as_peft_would():
    """A and B in float32 in a float64 block: the update in float32 from the input cast to it."""
    block = _block("torch", "lean")
    torch.manual_seed(2)
    block.mlp.c_fc = LowRankLinear(block.mlp.c_fc).float()
    block.mlp.c_fc.base.double()
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith((".A", ".B")))

    def reference(x):  # the update as PEFT computes it
        w = block.mlp.c_fc
        return (w.base(x) + w.scale * nn.functional.linear(nn.functional.linear(x.float(), w.A), w.B)).double()
    x, grad = torch.randn(L, B * T, D, dtype=torch.float64), torch.randn(L, B * T, D, dtype=torch.float64)
    y, gx, grads = _step(block, x, grad)
    block.backend = "reference"
    block.mlp.c_fc.forward = reference
    y_ref, gx_ref, grads_ref = _step(block, x, grad)
    assert {g.dtype for g in grads.values()} == {torch.float32}
    assert_rel("output", y, y_ref, 1e-6)
    assert_rel("grad x", gx, gx_ref, 1e-6)
    assert_grads_close(list(grads), list(grads.values()), [grads_ref[n] for n in grads], 1e-5)


@pytest.mark.parametrize("switch", ["disable_adapter", "set_adapter", "set_adapter-all-trainable"])
@pytest.mark.parametrize("level", LEVELS)
def test_switching_adapters_between_forward_and_backward(level, switch):
    """The backward of a forward that ran with the default adapter, run inside ``disable_adapter()`` or
    after ``set_adapter("other")``: the gradients of the forward that ran, as unpatched PEFT gives
    them (LoRA on q_proj/v_proj: the recomputation calls those modules, and replays the forward's
    adapter state; on fc1/fc2: fused, the update's tensors are saved). With every adapter trainable
    in backward, the default adapter's parameters get their gradients."""
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "fc1", "fc2"]
    original = _lora(tiny_xclip(torch.float64, attn_implementation="sdpa").train(), targets)
    original.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    original.set_adapter("default")
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="torch", recompute=level)
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)

    def step(model):
        v = video.clone().requires_grad_()
        y = model.get_video_features(pixel_values=v)
        y = getattr(y, "pooler_output", y)
        if switch == "disable_adapter":
            with model.disable_adapter():
                y.sum().backward()
        else:
            model.set_adapter("other")
            if switch.endswith("all-trainable"):
                for n, p in model.named_parameters():
                    p.requires_grad_("lora_" in n)
            y.sum().backward()
            model.set_adapter("default")
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return y.detach(), v.grad, grads

    y, gv, grads = step(patched)
    y_ref, gv_ref, ref = step(original)
    assert sorted(grads) == sorted(ref)
    assert all(".default." in n for n in ref) and bool(ref) == switch.endswith("all-trainable")
    assert_rel("features", y, y_ref, F64)
    assert_rel("grad video", gv, gv_ref, F64)
    if ref:
        assert_grads_close(list(ref), [grads[n] for n in ref], list(ref.values()), F64)
