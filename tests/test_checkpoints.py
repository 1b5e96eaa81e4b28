"""Official and Hugging Face weights: key mapping, loading from files, errors."""

import pytest
import torch
from _helpers import assert_rel, tiny_xclip

from xclip_fast.checkpoints import hf_to_official, official_to_hf
from xclip_fast.encoder import XCLIPVideoEncoder


def _tiny_encoder(**kw):
    torch.manual_seed(0)
    cfg = dict(input_resolution=32, patch_size=8, width=128, layers=2, heads=2, embed_dim=64, num_frames=3,
               mit_heads=1)
    cfg.update(kw)
    return XCLIPVideoEncoder(**cfg, backend="torch").eval()


def test_official_hf_round_trip_is_exact():
    hf_sd = tiny_xclip().state_dict()
    official, skipped = hf_to_official(hf_sd)
    assert all(k.startswith(("visual.", "mit.")) for k in official)
    assert any(k.startswith("text_model.") for k in skipped) and "logit_scale" in skipped
    back = official_to_hf(official)
    for key, value in back.items():
        assert torch.equal(value, hf_sd[key]), key
    vision_keys = {k for k in hf_sd if k.startswith(("vision_model.", "mit.", "visual_projection."))}
    assert set(back) == vision_keys - {k for k in vision_keys if k.endswith("position_ids")}
    again, _ = hf_to_official(back)
    assert set(again) == set(official) and all(torch.equal(again[k], official[k]) for k in official)


def test_qkv_merge_order_and_projection_transpose():
    hf_sd = tiny_xclip().state_dict()
    official, _ = hf_to_official(hf_sd)
    w = official["visual.transformer.resblocks.1.message_attn.in_proj_weight"]
    p = "vision_model.encoder.layers.1.message_attn."
    assert torch.equal(w[:64], hf_sd[p + "q_proj.weight"])
    assert torch.equal(w[64:128], hf_sd[p + "k_proj.weight"])
    assert torch.equal(w[128:], hf_sd[p + "v_proj.weight"])
    assert torch.equal(official["visual.proj"], hf_sd["visual_projection.weight"].t())
    assert "mit.resblocks.0.ln_2.weight" in official and "visual.ln_post.bias" in official


def test_from_official_file(tmp_path):
    enc = _tiny_encoder()
    sd = dict(enc.state_dict())
    sd["prompts_visual_proj"] = torch.randn(128, 64)  # keys of the text side and prompts are skipped
    sd["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(3, 3)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    loaded = XCLIPVideoEncoder.from_official(str(path), heads=2, mit_heads=1, backend="torch").eval()
    skipped = ["prompts_visual_proj", "transformer.resblocks.0.attn.in_proj_weight"]
    assert loaded.load_report["skipped"] == sorted(skipped)
    video = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        assert_rel("video embedding", loaded(video), enc(video), 1e-6)


def test_from_official_reads_the_configuration_off_the_weights():
    enc = _tiny_encoder(layers=3, num_frames=5)
    loaded = XCLIPVideoEncoder.from_official(enc.state_dict())
    cfg = loaded.config
    assert (cfg["width"], cfg["layers"], cfg["patch_size"], cfg["input_resolution"]) == (128, 3, 8, 32)
    assert (cfg["embed_dim"], cfg["num_frames"], cfg["heads"], cfg["mit_heads"]) == (64, 5, 2, 1)


def test_strict_loading_lists_missing_and_unexpected_keys():
    sd = dict(_tiny_encoder().state_dict())
    del sd["visual.ln_post.weight"]
    sd["visual.transformer.resblocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['visual.ln_post.weight'\].*unexpected keys "
                                         r"\['visual.transformer.resblocks.0.extra'\]"):
        XCLIPVideoEncoder.from_official(sd)
    loaded = XCLIPVideoEncoder.from_official(sd, strict=False)
    assert loaded.load_report["missing"] == ["visual.ln_post.weight"]
    assert loaded.load_report["unexpected"] == ["visual.transformer.resblocks.0.extra"]


def test_unknown_weight_formats_raise(tmp_path):
    with pytest.raises(ValueError, match="no 'visual.\\*' keys: not an official X-CLIP checkpoint"):
        XCLIPVideoEncoder.from_official({"model": {"foo": torch.zeros(1)}})
    with pytest.raises(ValueError, match="looks like Hugging Face weights"):
        XCLIPVideoEncoder.from_official(tiny_xclip().state_dict())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        XCLIPVideoEncoder.from_official(str(bad))
    with pytest.raises(ValueError, match="no X-CLIP vision weights"):
        XCLIPVideoEncoder.from_hf({"text_model.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="no such file or folder"):
        XCLIPVideoEncoder.from_hf(str(tmp_path / "missing" / "weights.bin"))


def test_pickled_official_file_needs_weights_only_false(tmp_path):
    import argparse

    path = tmp_path / "official.pth"
    # official files pickle their (yacs) config next to the weights: any non-tensor object does
    torch.save({"model": _tiny_encoder().state_dict(), "config": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="pass weights_only=False"):
        XCLIPVideoEncoder.from_official(str(path))
    loaded = XCLIPVideoEncoder.from_official(str(path), weights_only=False, heads=2, mit_heads=1)
    assert loaded.config["width"] == 128


def test_from_hf_files_and_folders(tmp_path):
    hf = tiny_xclip()
    video = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        expected = hf.get_video_features(pixel_values=video).pooler_output
    hf.save_pretrained(tmp_path / "folder")
    from_folder = XCLIPVideoEncoder.from_hf(str(tmp_path / "folder"), backend="torch").eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "w.safetensors"))
    # without config.json the heads follow the official 64-wide convention: give them
    from_file = XCLIPVideoEncoder.from_hf(str(tmp_path / "w.safetensors"), heads=2, mit_heads=2).eval()
    from_sd = XCLIPVideoEncoder.from_hf(hf.state_dict(), heads=2, mit_heads=2).eval()
    with torch.no_grad():
        for name, enc in (("folder", from_folder), ("safetensors", from_file), ("state dict", from_sd)):
            assert_rel(f"video embedding from {name}", enc(video), expected, 1e-5)


def test_vision_only_model_needs_strict_false():
    from transformers import XCLIPVisionModel

    hf = tiny_xclip()
    vision = XCLIPVisionModel(hf.config.vision_config)
    vision.load_state_dict(hf.vision_model.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        XCLIPVideoEncoder.from_hf(vision)
    enc = XCLIPVideoEncoder.from_hf(vision, strict=False, backend="torch").eval()
    assert "visual.proj" in enc.load_report["missing"]
    frames = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = enc.visual.embed(frames)
        ours = enc.visual.run_blocks(ours, 3)
        theirs = vision(pixel_values=frames).last_hidden_state
    assert_rel("vision-only last hidden state", ours.transpose(0, 1), theirs, 1e-5)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_any_hf_configuration_loads_and_matches(hidden_act):
    """MLP widths other than 4 x, another activation and another LayerNorm epsilon (HF allows all)."""
    model = tiny_xclip(torch.float64, attn_implementation="sdpa", intermediate_size=100, mit_intermediate_size=50,
                       hidden_act=hidden_act, layer_norm_eps=1e-6)
    enc = XCLIPVideoEncoder.from_hf(model, backend="torch")
    assert enc.config["intermediate_size"] == 100 and enc.config["mit_intermediate_size"] == 50
    assert enc.visual.blocks[0].ln_1.eps == 1e-6 and enc.mit.resblocks[0].ln_2.eps == 1e-6
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model.get_video_features(pixel_values=video).pooler_output
        assert_rel("from_hf vs transformers", enc(video), expected, 1e-10)
    # without the config the widths come from the weights (the activation cannot: quick_gelu assumed)
    if hidden_act == "quick_gelu":
        again = XCLIPVideoEncoder.from_hf(model.state_dict(), heads=2, mit_heads=2, strict=True)
        assert again.config["intermediate_size"] == 100 and again.config["mit_intermediate_size"] == 50


def test_loader_errors_name_the_file_and_the_problem(tmp_path, monkeypatch):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match=f"cannot read {bad} as a safetensors file"):
        XCLIPVideoEncoder.from_hf(str(bad))
    folder = tmp_path / "hf"
    tiny_xclip().save_pretrained(folder)
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match=f"cannot read {folder / 'config.json'} as a JSON model configuration"):
        XCLIPVideoEncoder.from_hf(str(folder))
    sd = tiny_xclip().state_dict()
    sd["vision_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"q/k/v projections of different shapes for "
                                         r"vision_model\.encoder\.layers\.0\.self_attn\.\{q,k,v\}_proj\.weight"):
        XCLIPVideoEncoder.from_hf(sd)
    with pytest.raises(ValueError, match="no_such_dir/model.pth: no such file or folder"):
        XCLIPVideoEncoder.from_hf("no_such_dir/model.pth")

    def offline(*args, **kwargs):
        raise OSError("no network here")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="'someone/nothing' is not a local file or folder, and fetching it as a "
                                         "Hugging Face hub model failed .*no network here"):
        XCLIPVideoEncoder.from_hf("someone/nothing")


def test_dtype_by_name():
    sd = _tiny_encoder().state_dict()
    assert XCLIPVideoEncoder.from_official(sd, dtype="float16").visual.conv1.weight.dtype == torch.float16
    assert XCLIPVideoEncoder.from_official(sd, dtype="torch.bfloat16").visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32', 'float64'\]"):
        XCLIPVideoEncoder.from_official(sd, dtype="half-ish")


def test_checkpoint_missing_blocks_is_not_a_shallower_model():
    """A B/32-width checkpoint with 11 of its 12 blocks: refused under strict, loudly loaded without."""
    full = XCLIPVideoEncoder(input_resolution=32, patch_size=16, width=768, layers=12, heads=12, embed_dim=64,
                             num_frames=2, backend="torch").state_dict()
    truncated = {k: v for k, v in full.items() if ".resblocks.11." not in k}
    with pytest.raises(ValueError, match="holds 11 vision blocks where released X-CLIP models of width 768 have 12"):
        XCLIPVideoEncoder.from_official(truncated)
    with pytest.warns(UserWarning, match="it may be missing blocks"):
        enc = XCLIPVideoEncoder.from_official(truncated, strict=False)
    assert len(enc.visual.blocks) == 11
    assert len(XCLIPVideoEncoder.from_official(truncated, layers=11).visual.blocks) == 11  # said explicitly
    gap = {k: v for k, v in full.items() if ".resblocks.5." not in k}
    with pytest.raises(ValueError, match=r"blocks \[5\] are missing from the checkpoint"):
        XCLIPVideoEncoder.from_official(gap, strict=False)


def test_loaded_encoder_takes_the_weights_dtype_unless_given():
    sd = {k: v.double() for k, v in _tiny_encoder().state_dict().items()}
    assert XCLIPVideoEncoder.from_official(sd).visual.conv1.weight.dtype == torch.float64
    half = XCLIPVideoEncoder.from_official(sd, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
