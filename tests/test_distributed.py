"""Data parallel training on 2 CPU processes (gloo): DDP and FSDP2 (one fully_shard per block, as
long clips are trained) give the gradients one process computes over the whole batch, on both fast
backends, at every recompute level and two memory budgets; so does DDP under activation offloading."""

import pytest
import torch
import torch.multiprocessing as mp
from _distributed_worker import batch, levels, loss_of, make_encoder, worker
from _helpers import TRITON_CPU_OK, TRITON_CPU_WHY, assert_grads_close, needs_gloo

pytestmark = needs_gloo
# the children run on CPU: the triton backend needs the interpreter there (set by conftest without CUDA)
_TRITON = pytest.mark.skipif(not TRITON_CPU_OK, reason=TRITON_CPU_WHY)
CASES = [pytest.param("torch", "ddp"), pytest.param("triton", "ddp", marks=_TRITON), pytest.param("torch", "fsdp2"),
         pytest.param("triton", "fsdp2", marks=_TRITON), pytest.param("torch", "ddp-offload")]


@pytest.mark.parametrize("backend, mode", CASES)
def test_data_parallel_gradients_equal_one_process(backend, mode, tmp_path):
    """``ddp-offload``: DDP with each forward under saved-tensor hooks that copy what autograd saves
    (as ``save_on_cpu`` does on a GPU)."""
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), backend, mode, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert sorted(results, key=str) == sorted(levels(backend), key=str)
    enc = make_encoder(backend, "none")
    loss_of(enc(batch())).backward()
    names = [n for n, _ in enc.named_parameters()]
    for recompute, grads in results.items():
        assert sorted(grads) == sorted(names), recompute
        # float64 on both sides; only the order of the gradient reduction (and of a few sums) differs
        assert_grads_close(names, [grads[n] for n in names], [p.grad for p in enc.parameters()], 1e-12)
