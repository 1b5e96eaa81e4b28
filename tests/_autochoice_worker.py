"""A rank of tests/test_autochoice.py's process group: a CPU stood in for a GPU, a timer that says what this
rank was told, and ``xclip_fast.tune`` over one attention call."""

import os

import torch
import torch.distributed as dist
from _helpers import gloo_group

IDENTITY = {"gpu": "Fake GPU", "arch": 90, "driver": "1.0", "torch": torch.__version__, "triton": "0"}


class FakeTimer:
    """Says each candidate takes ``ms[candidate.backend]`` (no timing at all); counts its calls."""

    def __init__(self, ms: dict):
        self.ms, self.calls = ms, []

    def measure(self, calls):
        from xclip_fast.bench.gputime import Timing

        name = calls[0].backend
        self.calls.append(name)
        ms = self.ms[name]
        return Timing(ms, ms, ms, None, "fake")


def stand_in_gpu(cache_dir: str):
    """Make ``auto`` decide for CPU tensors as for an sm_90 GPU, with its own cache and an empty table."""
    from xclip_fast import autochoice

    autochoice.arch_of = lambda device: 90
    autochoice.identity = lambda index=0: dict(IDENTITY)
    autochoice._TABLE = {}
    os.environ[autochoice.CACHE_ENV] = cache_dir
    os.environ.pop(autochoice.MEASURE_ENV, None)
    autochoice.forget()


def inputs(device="cpu"):
    """A packed attention's inputs with the message token, as a block's frame path makes them (float32)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 3, 3, 2, 16, generator=g).transpose(0, 1).to(device)
    return qkv, torch.randn(3, 2, 2, 16, generator=g).to(device)


def attend(qkv, extra):
    from xclip_fast.ops import packed_attention

    return packed_attention(qkv, extra)


def one_call(device="cpu"):
    return attend(*inputs(device))


def worker(rank, world, store, out, cache_root, ms_by_rank):
    from xclip_fast import autochoice
    from xclip_fast.ops import attention_call

    with gloo_group(rank, world, store):
        stand_in_gpu(os.path.join(cache_root, f"rank{rank}"))
        timer = FakeTimer(ms_by_rank[rank])
        decisions = autochoice.tune(one_call, timer=timer)
        qkv = torch.zeros(3, 5, 3, 2, 16)
        key = autochoice.key_for(torch.device("cpu"), torch.float32, 16,
                                 attention_call(qkv, torch.zeros(3, 2, 2, 16), False), False)
        mine = dict(chosen=autochoice.choose(torch.device("cpu"), torch.float32, 16,
                                             attention_call(qkv, torch.zeros(3, 2, 2, 16), False), qkv),
                    source=decisions[key].source, timed=list(timer.calls),
                    cache=os.path.exists(autochoice.cache_path()))
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save(everyone, out)
