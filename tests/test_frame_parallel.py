"""Frame parallelism on 2 and 4 CPU processes (gloo): the video embedding and every parameter
gradient, after the data-parallel reduction, equal to one process on the whole clip (float64,
1e-10), with uneven slices, every recompute level, both fast backends, autocast, torch.compile,
FSDP2, a 2 x 2 (videos x frames) mesh under DDP, and inference (chunked and streamed frames)."""

import pytest
import torch
import torch.distributed as dist
from _frame_parallel_worker import CONFIG, clip, loss_of, make_encoder, scenarios, worker
from _helpers import TRITON_CPU_OK, TRITON_CPU_WHY, assert_grads_close, assert_rel, needs_gloo, spawn_results

from xclip_fast.parallel import FrameParallel, _group_of, frame_sizes
from xclip_fast.testing import rel_err

pytestmark = needs_gloo
# float64 on both sides: the same operations on the same values, only GEMMs over fewer rows and the
# order of the gradient reduction differ
F64 = 1e-10


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return spawn_results(worker, 2, tmp_path_factory, "fp", TRITON_CPU_OK)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return spawn_results(worker, 4, tmp_path_factory, "fp", TRITON_CPU_OK)


def _one_process(sc: dict, b: int = 2, video=None):
    """The video embedding and gradients of one process over the whole clip."""
    dtype = torch.float32 if sc["autocast"] else torch.float64
    enc = make_encoder(sc["backend"], sc["recompute"], sc["droppath"], dtype)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sc["autocast"]):
        out = enc(clip(b, sc["T"], dtype=dtype) if video is None else video)
    loss_of(out.double()).backward()
    return out.detach().double(), enc


def _check(res: dict, out, enc, tol: float) -> None:
    assert_rel("video embedding", res["out"], out, tol)
    names = [n for n, _ in enc.named_parameters()]
    assert sorted(res["grads"]) == sorted(names)
    assert_grads_close(names, [res["grads"][n] for n in names], [p.grad for p in enc.parameters()], tol)


@pytest.mark.parametrize("name", [n for n in scenarios(2) if n != "autocast"])
def test_two_processes_equal_one(two, name):
    """Drop path 0.2 in training mode throughout: the same random numbers as one process."""
    sc = scenarios(2)[name]
    if sc["backend"] == "triton" and not TRITON_CPU_OK:
        pytest.skip(TRITON_CPU_WHY)
    _check(two[name], *_one_process(sc), F64)


def test_two_processes_autocast(two):
    """bfloat16 autocast on a float32 model, against the float64 truth: frame parallelism is as
    accurate as one process under the same autocast (its error at most 2x one process's, plus
    2^-9 for gradients one bf16 rounding away from zero)."""
    sc = scenarios(2)["autocast"]
    res = two["autocast"]
    out16, enc16 = _one_process(sc)
    out64, enc64 = _one_process(dict(sc, autocast=False))
    pairs = [("video embedding", res["out"], out16, out64)]
    pairs += [(n, res["grads"][n], p.grad, q.grad)
              for (n, p), q in zip(enc16.named_parameters(), enc64.parameters()) if q.grad.norm() > 0]
    for name, fp, one, truth in pairs:
        assert rel_err(fp, truth) <= 2 * rel_err(one, truth) + 2 ** -9, name


def test_four_processes_uneven_slices_equal_one(four):
    assert frame_sizes(6, 4) == (2, 2, 1, 1)
    _check(four["lean-uneven"], *_one_process(scenarios(4)["lean-uneven"]), F64)


def test_videos_by_frames_mesh_under_ddp_equals_one_process(four):
    """DDP over all four processes of a 2 x 2 mesh; one process over the four videos of both groups
    (equal-sized local means: the DDP average is the global mean)."""
    res = four["mesh"]
    out, enc = _one_process(dict(scenarios(4)["lean-uneven"], T=5), b=4)
    g = res["group"]
    assert g == 0  # rank 0 holds video group 0
    _check(res, out[2 * g:2 * g + 2], enc, F64)


def test_inference_chunked_and_streamed(four):
    enc = make_encoder("torch", "lean", droppath=0.0).eval()
    with torch.no_grad():
        ref = enc.forward_features(clip(1, 6))
    res = four["inference"]
    for key in ("plain", "chunked", "streamed"):
        assert_rel(key, res[key], ref.video_embeds, F64)
    assert_rel("frame embeddings", res["frame_embeds"], ref.frame_embeds, F64)


@pytest.mark.parametrize("name", ["lean-uneven", "none-even"])
def test_one_exchange_per_layer_and_its_bytes(two, name):
    """Counted: one all-gather forward and one reduce-scatter backward per CCT layer, and one each
    for the MIT input; an all-gather puts in this process's (b, T_own, d) rows, padded to the
    widest slice, a reduce-scatter the whole clip's gradient."""
    res, sc = two[name], scenarios(2)[name]
    widest = frame_sizes(sc["T"], 2)[0]
    layers, d, E, b, item = CONFIG["layers"], CONFIG["width"], CONFIG["embed_dim"], 2, 8
    assert res["calls"] == {"all_gather_into_tensor": layers + 1, "reduce_scatter_tensor": layers + 1}
    gathered = b * widest * (layers * d + E) * item
    assert res["bytes"] == {"all_gather_into_tensor": gathered, "reduce_scatter_tensor": 2 * gathered}


def test_refusals(two):
    msgs = two["refusals"]
    assert "frame parallelism needs the fast path" in msgs["reference"]
    assert "pass video[:, fp.frames]" in msgs["wrong-slice"]
    assert "needs num_frames >= 2" in msgs["too-few-frames"]
    assert "CrossFrameAttentionBlock's T has 4 frames per video on process 0" in msgs["block-T"]


def test_frame_sizes():
    assert frame_sizes(8, 4) == (2, 2, 2, 2)
    assert frame_sizes(7, 3) == (3, 2, 2)
    assert frame_sizes(3, 3) == (1, 1, 1)
    assert [len(s) for s in torch.arange(7).tensor_split(3)] == list(frame_sizes(7, 3))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_frames must be an int"):
            frame_sizes(bad, 2)


def test_needs_initialised_distributed_and_a_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        FrameParallel(8)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        _group_of("frames")


def test_an_exchange_returns_once_the_backend_thread_let_go_of_its_tensors(monkeypatch):
    """gloo's worker thread releases a finished collective's work (which holds its input and output)
    just after waking the caller; a tensor Python has seen keeps its Python object alive while C++
    holds it, so that release takes the GIL, and a process that exits right after its last exchange
    aborted now and then when the thread got there during interpreter finalization ("terminate
    called without an active exception", the frame-parallel script of docs/long-clips.md once in 50 runs two at
    a time). Here a collective whose "worker" (a thread) holds both tensors 30 ms after it returned,
    as a late thread does: the exchange returns only once they are released, with the GIL free
    meanwhile (the thread takes it to release them)."""
    import threading
    import time

    from torch.distributed import _functional_collectives as fc

    import xclip_fast.parallel as par

    released = []

    def late_gather(x, dim, group):
        out = torch.cat([x, x])
        with torch.enable_grad():  # C++ references to both, as the backend's work holds them: saved by autograd
            w = torch.ones((), requires_grad=True)
            held = [x * w, out * w]

        def worker():
            time.sleep(0.03)
            released.append(time.monotonic())
            held.clear()

        threading.Thread(target=worker, daemon=True).start()
        return out

    monkeypatch.setattr(fc, "all_gather_single_autograd", late_gather, raising=False)  # (torch 2.11: added)
    x = torch.randn(2, 3)
    before = x._use_count()
    full = par._all_gather(x, None)
    assert released and time.monotonic() >= released[0], "returned while the worker still held the tensors"
    assert x._use_count() == before
    assert torch.equal(full, torch.cat([x, x]))
