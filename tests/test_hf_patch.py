"""patch_xclip / unpatch_xclip on a transformers X-CLIP model."""

import copy

import pytest
import torch
from _helpers import BACKENDS, TRITON_OK, assert_rel, tiny_xclip

import xclip_fast
from xclip_fast.encoder import XCLIPVideoEncoder

# transformers' eager softmax runs in float32 even in float64 models: the oracle is fp32-accurate
HF_TOL = 1e-5
# float64 on both sides with sdpa attention: rounding only
F64_TOL = 1e-10


def _patched_pair(dtype, backend, device, attn_implementation="eager"):
    original = tiny_xclip(dtype, attn_implementation=attn_implementation).to(device)
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend=backend)
    return original, patched


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_model_matches_unpatched_outputs_and_gradients(backend, device):
    # sdpa attention keeps the unpatched model exact in float64, so gradients compare at 1e-10
    original, patched = _patched_pair(torch.float64, backend, device, attn_implementation="sdpa")
    for m in (original, patched):
        m.train()
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, device=device)
    ids = torch.randint(0, 99, (4, 6), device=device)
    out_o = original(input_ids=ids, pixel_values=video)
    out_p = patched(input_ids=ids, pixel_values=video)
    assert_rel("logits_per_video", out_p.logits_per_video, out_o.logits_per_video, F64_TOL)
    assert_rel("video_embeds", out_p.video_embeds, out_o.video_embeds, F64_TOL)
    weights = torch.randn_like(out_o.logits_per_video)
    (out_o.logits_per_video * weights).sum().backward()
    (out_p.logits_per_video * weights).sum().backward()
    grads_o = {name: p.grad for name, p in original.named_parameters()}
    grads_p = {name: p.grad for name, p in patched.named_parameters()}
    assert grads_p.keys() == grads_o.keys()
    # Some gradients are exactly zero in exact arithmetic (key biases shift a whole softmax row; in
    # layer 0 every frame's class token is the same, so the message attention is uniform): what is
    # computed for them is rounding noise. Each error is therefore measured against the larger of
    # the parameter's gradient and a floor of 1e-6 of the largest gradient in the model.
    floor = 1e-6 * max(g.norm().item() for g in grads_o.values() if g is not None)
    for name, g_ref in grads_o.items():
        g = grads_p[name]
        assert (g is None) == (g_ref is None), name
        if g is None:
            continue
        err = (g - g_ref).norm().item() / max(g_ref.norm().item(), floor)
        assert err <= F64_TOL, f"grad {name}: error {err:.2e} > {F64_TOL:.0e}"


def test_parameters_are_shared_not_copied(device):
    model = tiny_xclip(torch.float32).to(device)
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    xclip_fast.patch_xclip(model, backend="torch")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)
    assert list(model.state_dict()) == keys
    assert type(model.vision_model.encoder.layers[0]).__name__ == "FastXCLIPVisionEncoderLayer"
    xclip_fast.unpatch_xclip(model)
    assert type(model.vision_model.encoder.layers[0]).__name__ == "XCLIPVisionEncoderLayer"
    assert type(model.mit).__name__ == "XCLIPMultiframeIntegrationTransformer"
    assert all(p is before[n] for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="not patched"):
        xclip_fast.unpatch_xclip(model)


@pytest.mark.parametrize("T", [1, 3, 5])
def test_patched_model_takes_any_frame_count(T, device):
    original, patched = _patched_pair(torch.float32, "torch", device)
    enc = XCLIPVideoEncoder.from_hf(original, backend="torch").to(device)
    video = torch.randn(2, T, 3, 32, 32, device=device)
    with torch.no_grad():
        out = patched.get_video_features(pixel_values=video).pooler_output
        assert out.shape == (2, 32)
        assert_rel("patched video features vs encoder", out, enc(video), HF_TOL)
        if T == 3:  # the trained length: identical to the unpatched model
            assert_rel("vs unpatched", out, original.get_video_features(pixel_values=video).pooler_output, HF_TOL)


def test_patch_rejects_bad_models_and_double_patching():
    with pytest.raises(ValueError, match="expected a transformers XCLIPModel or XCLIPVisionModel"):
        xclip_fast.patch_xclip(torch.nn.Linear(2, 2))
    model = tiny_xclip()
    xclip_fast.patch_xclip(model, backend="torch")
    with pytest.raises(ValueError, match="already patched"):
        xclip_fast.patch_xclip(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        xclip_fast.patch_xclip(tiny_xclip(), backend="fast")


def test_attention_dropout_runs_on_torch_and_triton_refuses_it(device):
    """Attention dropout (HF allows it) is honoured in training by the torch backend, which "auto"
    picks; evaluation is dropout-free and equals the unpatched model; explicit triton refuses."""
    original = tiny_xclip(torch.float64, attention_dropout=0.5, attn_implementation="sdpa").to(device)
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="auto")
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        expected = original.get_video_features(pixel_values=video).pooler_output
        assert_rel("eval (no dropout)", patched.get_video_features(pixel_values=video).pooler_output, expected,
                   F64_TOL)
        patched.train()
        a = patched.get_video_features(pixel_values=video).pooler_output
        b = patched.get_video_features(pixel_values=video).pooler_output
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-6, "dropout must act in training"
    if TRITON_OK:
        xclip_fast.hf.set_backend(patched, "triton")
        with pytest.raises(ValueError, match="attention dropout is not supported by the triton kernels"):
            patched.get_video_features(pixel_values=video.to(device))


def test_patched_vision_model(device):
    from transformers import XCLIPVisionModel

    hf = tiny_xclip(torch.float64).to(device)
    vision = XCLIPVisionModel(hf.config.vision_config).to(device, torch.float64).eval()
    vision.load_state_dict(hf.vision_model.state_dict())
    frames = torch.randn(6, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        expected = vision(pixel_values=frames).last_hidden_state
        xclip_fast.patch_xclip(vision, backend="torch")
        got = vision(pixel_values=frames).last_hidden_state
    assert_rel("patched XCLIPVisionModel", got, expected, HF_TOL)


def test_deep_copies_are_models_of_their_own(device):
    """EMA and teacher models are made with copy.deepcopy: the copy must compute with its own weights."""
    model = xclip_fast.patch_xclip(tiny_xclip(torch.float64).to(device), backend="torch")
    ema = copy.deepcopy(model)
    assert all(p is not q for p, q in zip(model.parameters(), ema.parameters()))
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        before = model.get_video_features(pixel_values=video).pooler_output
        for p in ema.parameters():
            p.mul_(0.9)
        after_copy = ema.get_video_features(pixel_values=video).pooler_output
        assert_rel("original untouched by the copy's update", model.get_video_features(pixel_values=video)
                   .pooler_output, before, 0.0)
    assert (after_copy - before).abs().max() > 1e-3, "the copy computed with the original's weights"
    assert xclip_fast.hf.is_patched(ema)


def test_torch_save_of_a_patched_model(tmp_path, device):
    model = xclip_fast.patch_xclip(tiny_xclip(torch.float64).to(device), backend="torch")
    video = torch.randn(1, 5, 3, 32, 32, dtype=torch.float64, device=device)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        assert_rel("reloaded", loaded.get_video_features(pixel_values=video).pooler_output,
                   model.get_video_features(pixel_values=video).pooler_output, 0.0)
    xclip_fast.unpatch_xclip(loaded)
    from transformers import XCLIPModel

    assert type(loaded) is XCLIPModel  # (the patched class is named XCLIPModel too, for save_pretrained)


def test_output_hidden_states_of_the_patched_model(device):
    original = tiny_xclip(torch.float64, attn_implementation="sdpa").to(device)
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="torch")
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        want = original.get_video_features(pixel_values=video, output_hidden_states=True).hidden_states
        got = patched.get_video_features(pixel_values=video, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3  # the embeddings and one per layer
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel(f"hidden state {i}", g, w, F64_TOL)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_patch_any_configuration(hidden_act, device):
    """MLP widths other than 4 x, any activation and LayerNorm epsilon, as Hugging Face allows."""
    original = tiny_xclip(torch.float64, attn_implementation="sdpa", intermediate_size=100,
                          mit_intermediate_size=50, hidden_act=hidden_act, layer_norm_eps=1e-6).to(device)
    patched = xclip_fast.patch_xclip(copy.deepcopy(original), backend="torch")
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        assert_rel("video features", patched.get_video_features(pixel_values=video).pooler_output,
                   original.get_video_features(pixel_values=video).pooler_output, F64_TOL)


def test_patched_vision_model_takes_num_frames(device):
    """A bare XCLIPVisionModel gets frames (b*T, C, H, W) and T as num_frames (default: the config's)."""
    from transformers import XCLIPVisionModel

    hf = tiny_xclip(torch.float64, attn_implementation="sdpa").to(device)
    vision = XCLIPVisionModel(hf.config.vision_config).to(device, torch.float64).eval()
    vision.load_state_dict(hf.vision_model.state_dict())
    patched = xclip_fast.patch_xclip(copy.deepcopy(vision), backend="torch")
    frames = torch.randn(2 * 5, 3, 32, 32, dtype=torch.float64, device=device)
    enc = XCLIPVideoEncoder.from_hf(hf, backend="torch").to(device)
    with torch.no_grad():
        got = patched(pixel_values=frames, num_frames=5).last_hidden_state
        want = enc.forward_features(frames.view(2, 5, 3, 32, 32)).last_hidden_state.flatten(0, 1)
        assert_rel("patched vision model with num_frames=5", got, want, F64_TOL)
        with pytest.raises(ValueError, match="10 frames are not a whole number of videos of num_frames=3"):
            patched(pixel_values=frames[:10])  # the config's 3 frames do not divide 10


def test_trainer_runs_a_few_steps_on_a_patched_model(tmp_path):
    """transformers' Trainer (one process, CPU): the contrastive loss goes down on a fixed batch,
    the patched layers' parameters move, and the weights it saves load in the original class."""
    from transformers import Trainer, TrainingArguments, XCLIPModel

    model = xclip_fast.patch_xclip(tiny_xclip(torch.float32).train())
    g = torch.Generator().manual_seed(0)
    rows = [dict(pixel_values=torch.randn(3, 3, 32, 32, generator=g), input_ids=torch.randint(0, 99, (6,), generator=g))
            for _ in range(4)]

    def collate(batch):
        return dict(pixel_values=torch.stack([r["pixel_values"] for r in batch]),
                    input_ids=torch.stack([r["input_ids"] for r in batch]), return_loss=True)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", disable_tqdm=True)
    before = model.vision_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert not torch.equal(before, model.vision_model.encoder.layers[0].mlp.fc1.weight)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = XCLIPModel.from_pretrained(str(tmp_path / "saved"))
    assert type(reloaded) is XCLIPModel
    assert torch.equal(reloaded.vision_model.encoder.layers[0].mlp.fc1.weight,
                       model.vision_model.encoder.layers[0].mlp.fc1.weight.detach())
