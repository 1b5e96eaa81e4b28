"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only`` (needs the ``bench`` extra).

The same workloads and providers as ``xclip-fast bench`` (``xclip_fast.bench``), timed by
pytest-benchmark; CUDA is synchronised inside the timed function. Providers that cannot run here
are skipped with their reason. Correctness is the test suite's job (and ``xclip-fast bench``
checks every provider before timing); this suite only times.
"""

import pytest
import torch

from xclip_fast.bench import Case, Skip, Workload, grad_out

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODEL = "b16" if CUDA else "b32"
_W, _H, _L = (768, 12, 197) if CUDA else (768, 12, 50)

CASES = {
    "frame-attention": Case("attention", "frames", MODEL, 32 if CUDA else 2, 8, _L, _W, _H),
    "message-attention-T32": Case("attention", "messages", MODEL, 8 if CUDA else 1, 32, 0, _W, _H),
    "block-T8": Case("block", "block", MODEL, 8 if CUDA else 1, 8, _L, _W, _H),
}
PROVIDERS = ["reference", "sdpa-flash", "sdpa-efficient", "xformers", "xclip-fast-torch", "xclip-fast-triton"]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_speed(benchmark, case, provider, mode):
    work = Workload(CASES[case], DTYPE, DEVICE, grad=mode == "fwdbwd")
    try:
        fn = work.provider(provider)
        work.run(fn, mode, grad_out(work, mode))
    except Skip as exc:
        pytest.skip(str(exc))
    g_out = grad_out(work, mode)

    def call():
        work.clear_grads()
        work.run(fn, mode, g_out)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"{case} {mode}"
    benchmark(call)
