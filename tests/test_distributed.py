"""Data parallel training on 2 CPU processes (gloo): DDP and FSDP2 give the gradients one process
computes over the whole batch, on both fast backends (FSDP2 with one fully_shard per block and
activation checkpointing, as long clips are trained)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _distributed_worker import batch, loss_of, make_encoder, worker
from _helpers import assert_grads_close

from xclip_fast.ops import triton_status

TRITON_OK, TRITON_WHY = triton_status("cpu")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
# the children run on CPU: the triton backend needs the interpreter there (set by conftest without CUDA)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY))]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_data_parallel_gradients_equal_one_process(backend, mode, tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), backend, mode, str(out)), nprocs=2, join=True)
    grads = torch.load(out)
    enc = make_encoder(backend)
    loss_of(enc(batch())).backward()
    names = [n for n, _ in enc.named_parameters()]
    assert sorted(grads) == sorted(names)
    # float64 on both sides; only the order of the gradient reduction differs
    assert_grads_close(names, [grads[n] for n in names], [p.grad for p in enc.parameters()], 1e-12)
