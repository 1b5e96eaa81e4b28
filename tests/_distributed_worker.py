"""The per-process part of tests/test_distributed.py (spawned; kept out of the test module so that
the children import no test module, only the shared helpers)."""

import contextlib

import torch
from _helpers import cpu_mesh, gloo_group

from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.testing import copied_saved_tensors

CONFIG = dict(input_resolution=16, patch_size=8, width=64, layers=2, heads=2, embed_dim=32, num_frames=3,
              mit_heads=2)
BATCH = 4


# every recompute level and two memory budgets (the budget mixes levels over the blocks)
RECOMPUTE = ["lean", "min", "none", "block", 0.6, 0.3]
# the triton backend runs through the CPU interpreter (slow): one level per kind of saving (the
# fused Function, whole-layer checkpointing, a budget mixing levels); every level runs on it in
# tests/test_recompute.py
RECOMPUTE_TRITON = ["lean", "block", 0.3]


def levels(backend: str) -> list:
    return RECOMPUTE_TRITON if backend == "triton" else RECOMPUTE


def make_encoder(backend: str, recompute="lean") -> XCLIPVideoEncoder:
    torch.manual_seed(0)
    return XCLIPVideoEncoder(**CONFIG, backend=backend, recompute=recompute, droppath=0.0).double().train()


def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, CONFIG["num_frames"], 3, 16, 16, generator=g, dtype=torch.float64)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A mean over the (local) batch: DDP and FSDP average gradients over ranks, so the average of
    equal-sized local means is the global mean one process computes."""
    return out.square().sum(-1).mean()


def worker(rank: int, world: int, store: str, backend: str, mode: str, out_path: str) -> None:
    with gloo_group(rank, world, store):
        results = {}
        for recompute in levels(backend):
            enc = make_encoder(backend, recompute)
            if mode.startswith("ddp"):
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(enc)
            else:
                from torch.distributed.fsdp import fully_shard

                mesh = cpu_mesh()
                for block in enc.visual.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(enc, mesh=mesh)
                model = enc
            per_rank = BATCH // world
            # "ddp-offload": the forward under hooks that copy what autograd saves (activation offloading)
            with copied_saved_tensors() if mode == "ddp-offload" else contextlib.nullcontext():
                loss = loss_of(model(batch()[rank * per_rank:(rank + 1) * per_rank]))
            loss.backward()
            grads = {}
            for name, p in model.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name.removeprefix("module.")] = g.detach().clone()
            results[recompute] = grads
        if rank == 0:
            torch.save(results, out_path)
