"""Frame parallelism through a patched Hugging Face ``XCLIPModel`` on 2 and 3 CPU processes (gloo):
logits, contrastive loss and every parameter gradient (vision tower, MIT, prompt generator, text
tower) after the data-parallel reduction, against one process of the *unpatched* model on the whole
clip (float64, sdpa attention: exact), with uneven slices (5 frames as 3 + 2 and 2 + 2 + 1), every
recompute level, both fast backends, drop path, autocast, a layer on the original computation,
DDP, FSDP2 and torch.compile; inference through ``get_video_features`` and a bare
``XCLIPVisionModel``."""

import sys

import pytest
import torch
from _helpers import TRITON_CPU_OK, TRITON_CPU_WHY, assert_grads_close, assert_rel, needs_gloo, spawn_results
from _hf_parallel_worker import inputs, model_of, scenarios, step, worker

from xclip_fast.parallel import frame_sizes
from xclip_fast.testing import rel_err

pytestmark = needs_gloo
# float64 on both sides: the same operations on the same values; only GEMMs over fewer rows, the
# mean over frames taken as a sum over processes, and the order of the gradient reduction differ
F64 = 1e-10


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return spawn_results(worker, 2, tmp_path_factory, "hf", TRITON_CPU_OK)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return spawn_results(worker, 3, tmp_path_factory, "hf", TRITON_CPU_OK)


def _one_process(sc: dict, patched: bool = False):
    """One process over the whole clip: the unpatched model (the truth), or the patched one."""
    dtype = torch.float32 if sc["autocast"] else torch.float64
    model = model_of(sc["backend"], sc["recompute"], sc["droppath"], dtype, patched=patched)
    return step(model, None, sc["autocast"]), model


def _check(res: dict, one: dict, model, tol: float) -> None:
    for key in ("logits", "loss", "video", "text"):
        assert_rel(key, res[key], one[key], tol)
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    assert sorted(res["grads"]) == sorted(names)
    assert_grads_close(names, [res["grads"][n] for n in names], [model.get_parameter(n).grad for n in names], tol)


def _scenario(world: int, name: str) -> dict:
    sc = scenarios(world)[name]
    if sc["backend"] == "triton" and not TRITON_CPU_OK:
        pytest.skip(TRITON_CPU_WHY)
    return sc


@pytest.mark.parametrize("name", [n for n in scenarios(2) if n != "autocast"])
def test_two_processes_equal_one(two, name):
    """Drop path (0.3, "droppath") draws the numbers one process draws for the whole clip: the
    message attention, the only place it applies in Hugging Face's layer, runs on every frame."""
    sc = _scenario(2, name)
    _check(two[name], *_one_process(sc), F64)


@pytest.mark.parametrize("name", list(scenarios(3)))
def test_three_processes_uneven_equal_one(three, name):
    assert frame_sizes(5, 3) == (2, 2, 1)
    _check(three[name], *_one_process(_scenario(3, name)), F64)


def test_two_processes_autocast(two):
    """bfloat16 autocast on a float32 model against the float64 truth: as accurate as one process
    of the patched model under the same autocast (at most 2x its error, plus 2^-9 for values one
    bf16 rounding from zero)."""
    sc = scenarios(2)["autocast"]
    res = two["autocast"]
    one16, m16 = _one_process(sc, patched=True)
    one64, m64 = _one_process(dict(sc, autocast=False))
    for key in ("logits", "loss", "video", "text"):
        assert rel_err(res[key], one64[key]) <= 2 * rel_err(one16[key], one64[key]) + 2 ** -9, key
    # gradients exactly zero in exact arithmetic (see assert_grads_close) measured against a floor
    floor = 1e-6 * max(p.grad.norm().item() for p in m64.parameters() if p.grad is not None)
    for name, p in m64.named_parameters():
        if p.grad is not None:
            scale = max(p.grad.norm().item(), floor)
            one_err = (m16.get_parameter(name).grad.double() - p.grad).norm().item() / scale
            assert (res["grads"][name] - p.grad).norm().item() / scale <= 2 * one_err + 2 ** -9, name


def test_inference_features_and_bare_vision_model(two):
    """``get_video_features`` gives the whole clip's video embedding on every process; a bare
    ``XCLIPVisionModel`` gives this process's frames of the one-process output."""
    model = model_of(patched=False).eval()
    video = inputs()["pixel_values"]
    with torch.no_grad():
        feats = model.get_video_features(video).pooler_output
        hidden = model.vision_model(video.flatten(0, 1)).last_hidden_state.unflatten(0, video.shape[:2])
    for res in two["inference"]:
        assert_rel(f"video features, rank {res['rank']}", res["features"], feats, F64)
        start, stop = res["frames"]
        assert_rel(f"vision tokens, rank {res['rank']}", res["vision"], hidden[:, start:stop].flatten(0, 1), F64)


def test_refusals(two):
    msgs = two["refusals"]
    assert "pass video[:, fp.frames]" in msgs["wrong-slice"]
    assert "gradient checkpointing" in msgs["hf-checkpointing"]


def test_an_unpatched_model_given_frame_parallel_is_caught(two):
    """transformers passes ``frame_parallel=`` down unused: each process computes its own frames
    alone. ``fp.expect_exchange()`` raises after such a call (a model configured for the process's
    frames runs; one configured for the clip fails on a shape, and the note says why), and
    ``fp.average_gradients`` refuses when no exchange ever ran. Every training scenario above ran
    inside ``expect_exchange()``: the patched model exchanges under DDP, FSDP2 and torch.compile."""
    msgs = two["refusals"]
    assert msgs["unpatched"].startswith("RuntimeError: xclip_fast: no frame exchange ran")
    assert "patch_xclip(model), again after from_pretrained" in msgs["unpatched"]
    shape = msgs["unpatched-shape"]
    assert shape is not None and "ignored frame_parallel=" not in shape.split("\n")[0]  # transformers' own error
    if sys.version_info >= (3, 11):  # (exception notes)
        assert "xclip_fast: no frame exchange ran" in shape.split("\n", 1)[1]
    assert msgs["unpatched-average"].startswith("RuntimeError: xclip_fast: average_gradients: no frame exchange")
