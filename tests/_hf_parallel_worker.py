"""The per-process part of tests/test_hf_parallel.py (spawned). Each scenario runs one training
step of a patched Hugging Face ``XCLIPModel`` (contrastive loss, ``return_loss=True``) with this
process's frames and writes what the test compares, from rank 0: the logits, the loss and every
parameter gradient after the data-parallel reduction."""

import copy

import torch
import torch.distributed as dist
from _helpers import cpu_mesh, error_messages, gloo_group, tiny_xclip

import xclip_fast
from xclip_fast.parallel import FrameParallel

T = 5  # frames per video: uneven over 2 (3 + 2) and 3 (2 + 2 + 1) processes
B = 2  # videos, and as many captions (the contrastive loss pairs video i with caption i)


def model_of(backend: str = "torch", recompute: str = "lean", droppath: float = 0.0, dtype=torch.float64,
             patched: bool = True):
    """The tiny model (sdpa attention: exact in float64), in training mode."""
    model = tiny_xclip(dtype, num_frames=T, attn_implementation="sdpa", drop_path_rate=droppath).train()
    return xclip_fast.patch_xclip(model, backend=backend, recompute=recompute) if patched else model


def inputs(dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(1)
    video = torch.randn(B, T, 3, 32, 32, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, 99, (B, 6), generator=g)
    return dict(input_ids=ids, pixel_values=video, attention_mask=torch.ones_like(ids))


def step(model, fp, autocast: bool = False, seed: int = 7, **extra) -> dict:
    """One forward + backward with this process's frames (all of them when ``fp`` is None)."""
    batch = inputs(next(model.parameters()).dtype)
    if fp is not None:
        batch["pixel_values"] = batch["pixel_values"][:, fp.frames]
        extra["frame_parallel"] = fp
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch, return_loss=True, **extra)
    out.loss.backward()
    return dict(logits=out.logits_per_video.detach().double(), loss=out.loss.detach().double(),
                video=out.video_embeds.detach().double(), text=out.text_embeds.detach().double())


def grads_of(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.removeprefix("module.").removeprefix("_orig_mod.")] = g.detach().double().clone()
    return out


def scenarios(world: int) -> dict:
    """The training steps run on ``world`` processes, by name: backend, recompute level, how the
    model is wrapped (``mode``), autocast, drop path."""
    def sc(backend="torch", recompute="lean", mode="plain", autocast=False, droppath=0.0):
        return dict(backend=backend, recompute=recompute, mode=mode, autocast=autocast, droppath=droppath)

    if world == 3:
        return {"lean": sc(), "block": sc(recompute="block")}
    out = {level: sc(recompute=level) for level in ("lean", "none", "min", "block")}
    out.update({"triton": sc("triton"), "droppath": sc(droppath=0.3), "autocast": sc(autocast=True),
                "original": sc(mode="original"), "ddp": sc(mode="ddp"), "fsdp2": sc(recompute="block", mode="fsdp2"),
                "compiled": sc(mode="aot_eager")})
    return out


def run_scenario(sc: dict, fp) -> dict:
    dtype = torch.float32 if sc["autocast"] else torch.float64
    model = model_of(sc["backend"], sc["recompute"], sc["droppath"], dtype)
    module = model
    if sc["mode"] == "original":  # a hook on one attention module: that layer runs transformers' computation
        model.vision_model.encoder.layers[1].self_attn.register_forward_hook(lambda m, i, o: None)
    elif sc["mode"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(model)
    elif sc["mode"] == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = cpu_mesh()
        for layer in model.vision_model.encoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params={model.logit_scale})  # (FSDP2 refuses a scalar parameter)
    elif sc["mode"] == "aot_eager":
        module = torch.compile(model, backend="aot_eager")
    with fp.expect_exchange():  # (under every wrapper: DDP, FSDP2, compiled)
        res = step(module, fp, sc["autocast"])
    if sc["mode"] == "fsdp2":  # the parameter FSDP2 leaves alone
        dist.all_reduce(model.logit_scale.grad)
        model.logit_scale.grad /= fp.world_size
    elif sc["mode"] != "ddp":
        fp.average_gradients(model)
    res["grads"] = grads_of(model)
    return res


def features_and_vision(fp) -> dict:
    """Inference through ``get_video_features`` and a bare ``XCLIPVisionModel`` on this process's
    frames (evaluation mode, no autograd)."""
    model = model_of(patched=False).eval()
    vision = xclip_fast.patch_xclip(copy.deepcopy(model.vision_model))
    xclip_fast.patch_xclip(model)
    video = inputs()["pixel_values"]
    own = video[:, fp.frames]
    with torch.no_grad():
        feats = model.get_video_features(own, frame_parallel=fp).pooler_output
        hidden = vision(own.flatten(0, 1), frame_parallel=fp).last_hidden_state
    return {"features": feats, "vision": hidden, "rank": fp.rank, "frames": (fp.start, fp.stop)}


def refusals(fp) -> dict:
    model = model_of()
    batch = inputs()
    gc = model_of()
    gc.gradient_checkpointing_enable()
    # unpatched, as from_pretrained gives it: transformers passes frame_parallel= down unused. Configured
    # for this process's frames, it runs (on them alone); configured for the clip, it fails on a shape
    unpatched = tiny_xclip(torch.float64, num_frames=fp.local_frames, attn_implementation="sdpa").train()
    whole = model_of(patched=False)
    fresh = FrameParallel(T)

    def unpatched_call(model):
        with fp.expect_exchange():
            step(model, fp)

    def unpatched_average():
        step(unpatched, fresh)
        fresh.average_gradients(unpatched)

    cases = {
        "unpatched": lambda: unpatched_call(unpatched),
        "unpatched-shape": lambda: unpatched_call(whole),
        "unpatched-average": unpatched_average,
        "wrong-slice": lambda: model(**batch, frame_parallel=fp),
        "hf-checkpointing": lambda: gc(**dict(batch, pixel_values=batch["pixel_values"][:, fp.frames]),
                                       frame_parallel=fp),
    }
    return error_messages(cases)


def worker(rank: int, world: int, store: str, out_path: str, triton_ok: bool) -> None:
    with gloo_group(rank, world, store):
        fp = FrameParallel(T)
        results = {}
        for name, sc in scenarios(world).items():
            if sc["backend"] == "triton" and not triton_ok:
                continue
            results[name] = run_scenario(sc, fp)
        results["inference"] = features_and_vision(fp)
        if world == 2:
            results["refusals"] = refusals(fp)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results["inference"], gathered)
        if rank == 0:
            results["inference"] = gathered
            torch.save(results, out_path)
