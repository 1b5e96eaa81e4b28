"""The per-process part of tests/test_frame_parallel.py (spawned; kept out of the test module so
that the children import no test module). Each scenario writes what the test compares: the video
embedding and the gradients after the data-parallel reduction, from rank 0."""

import contextlib

import torch
import torch._inductor.config
from _helpers import cpu_mesh, error_messages, gloo_group

from xclip_fast.bench.memory import CollectiveCounter
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.parallel import FrameParallel
from xclip_fast.testing import copied_saved_tensors

CONFIG = dict(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32, num_frames=4,
              mit_heads=2)


def make_encoder(backend: str = "torch", recompute: str | float = "lean", droppath: float = 0.2,
                 dtype: torch.dtype = torch.float64) -> XCLIPVideoEncoder:
    torch.manual_seed(0)
    enc = XCLIPVideoEncoder(**CONFIG, backend=backend, recompute=recompute, droppath=droppath)
    return enc.to(dtype).train()


def clip(b: int, T: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, T, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A mean over the (local) videos: the data-parallel average of equal-sized local means is the
    global mean one process computes."""
    return out.square().sum(-1).mean()


def one_step(model, video, fp, seed: int = 7, autocast: bool = False, offload: bool = False):
    """Embedding and loss gradient of one forward + backward; drop path seeded alike everywhere;
    ``offload``: the forward under hooks that copy what autograd saves (activation offloading)."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            copied_saved_tensors() if offload else contextlib.nullcontext(), fp.expect_exchange():
        out = model(video, frame_parallel=fp)
    loss_of(out.double()).backward()
    return out.detach().double()


def grads_of(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.removeprefix("module.").removeprefix("_orig_mod.")] = g.detach().clone()
    return out


def scenario(backend="torch", recompute="lean", T=4, autocast=False, mode="plain", droppath=0.2,
             offload=False) -> dict:
    """One training step's settings: ``mode`` "plain" (gradients averaged by
    ``FrameParallel.average_gradients``), "aot_eager" or "inductor" (torch.compile) or "fsdp2";
    autocast runs a float32 model in bfloat16 (autocast leaves float64 alone); ``offload``: the
    forward under activation offloading (see :func:`one_step`)."""
    return dict(backend=backend, recompute=recompute, T=T, autocast=autocast, mode=mode, droppath=droppath,
                offload=offload)


def scenarios(world: int) -> dict:
    """The training steps run on ``world`` processes in one group, by name."""
    if world == 4:
        return {"lean-uneven": scenario(T=6)}
    out = {"lean-uneven": scenario(T=5)}
    out.update({f"{level}-even": scenario(recompute=level) for level in ("none", "min", "block", 0.4)})
    out["triton"] = scenario("triton", T=3)
    out["autocast"] = scenario(autocast=True, droppath=0.0)  # (bf16 and float64 draw different numbers)
    out["aot_eager"] = scenario(mode="aot_eager")
    out["inductor"] = scenario(recompute="min", T=3, mode="inductor")
    out["fsdp2"] = scenario(recompute="block", mode="fsdp2")
    out.update({f"offload-{level}": scenario(recompute=level, T=5, offload=True) for level in ("lean", "min")})
    return out


def worker(rank: int, world: int, store: str, out_path: str, triton_ok: bool) -> None:
    with gloo_group(rank, world, store):
        results = {}
        for name, sc in scenarios(world).items():
            if sc["backend"] == "triton" and not triton_ok:
                continue
            dtype = torch.float32 if sc["autocast"] else torch.float64
            enc = make_encoder(sc["backend"], sc["recompute"], sc["droppath"], dtype)
            fp = FrameParallel(sc["T"], None)
            model = enc
            if sc["mode"] in ("aot_eager", "inductor"):
                # one graph (a graph break fails); Inductor draws drop-path numbers as eager does
                torch._inductor.config.fallback_random = True
                model = torch.compile(enc, backend=sc["mode"], fullgraph=True)
            elif sc["mode"] == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                mesh = cpu_mesh()
                for block in enc.visual.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(enc, mesh=mesh)
            video = clip(2, sc["T"], dtype=dtype)
            counter = CollectiveCounter()
            with counter if sc["mode"] == "plain" else contextlib.nullcontext():
                out = one_step(model, video[:, fp.frames], fp, autocast=sc["autocast"], offload=sc["offload"])
            if sc["mode"] != "fsdp2":
                fp.average_gradients(enc)
            results[name] = dict(out=out, grads=grads_of(enc), calls=counter.calls, bytes=counter.bytes)
        if world == 4:
            results.update(mesh_scenario(rank))
            results.update(inference_scenario(rank))
        if world == 2:
            results.update(refusals())
        if rank == 0:
            torch.save(results, out_path)


def mesh_scenario(rank: int) -> dict:
    """A 2 x 2 mesh, videos x frames: DDP over all four processes, each pair of video groups with
    its own two videos, each split over two processes by frames."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("videos", "frames"))
    fp = FrameParallel(5, mesh["frames"])
    enc = make_encoder("torch", "lean")
    model = DistributedDataParallel(enc)
    group = mesh["videos"].get_local_rank()
    video = clip(4, 5)[2 * group:2 * group + 2]
    out = one_step(model, video[:, fp.frames], fp)
    return {"mesh": dict(out=out, grads=grads_of(model), T=5, group=group)}


def inference_scenario(rank: int) -> dict:
    """Inference: the forward, chunked frames and frames arriving from an iterable, each process
    holding its own frames only."""
    enc = make_encoder("torch", "lean", droppath=0.0).eval()
    fp = FrameParallel(6)
    video = clip(1, 6)
    own = video[:, fp.frames]
    with torch.no_grad():
        plain = enc(own, frame_parallel=fp)
        with fp.expect_exchange():
            chunked = enc(own, chunk_frames=1, frame_parallel=fp)
        with fp.expect_exchange():
            streamed = enc.encode_frames(iter(own[0]), fp.local_frames, frame_parallel=fp)
    return {"inference": dict(plain=plain, chunked=chunked, streamed=streamed.video_embeds,
                              frame_embeds=streamed.frame_embeds)}


def refusals() -> dict:
    """The messages of what frame parallelism refuses, for the test to check."""
    fp = FrameParallel(4)
    cases = {
        "reference": lambda: make_encoder("reference")(clip(1, 4)[:, fp.frames], frame_parallel=fp),
        "wrong-slice": lambda: make_encoder()(clip(1, 4), frame_parallel=fp),
        "too-few-frames": lambda: FrameParallel(1),
        "block-T": lambda: make_encoder().visual.blocks[0](torch.zeros(5, 4, 64, dtype=torch.float64), 4,
                                                          frame_parallel=fp),
    }
    return {"refusals": error_messages(cases)}
