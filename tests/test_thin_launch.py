"""No eager launch goes through ``torch.library.wrap_triton``'s tracing path.

Outside a ``triton_op``, ``torch.library.wrap_triton(kernel)[grid](...)`` traces every launch into a
higher-order op (host time, and one entry per call in PyTorch's kernel side table, without bound in a long
loop). ``xclip_fast.kernels.wrap_triton`` hands out the tracing wrapper only under a dispatch mode (a
trace). Here the tracing wrapper is replaced by a recorder and the interpreter's kernels are treated as
compiled ones, so that every eager path, ``torch.func`` transforms, the kernels launched alone (the tuner,
the lab) and a compiled graph's run included, shows whether it would have gone through it; each path
must also have launched our kernels (read from the launches), or it proves nothing.
"""

import pytest
import torch
from _helpers import needs_triton
from test_gputime import record_launches

import xclip_fast
from xclip_fast import kernels
from xclip_fast.blocks import CrossFrameAttentionBlock, ResidualAttentionBlock
from xclip_fast.mlp import quick_gelu, quick_gelu_mlp
from xclip_fast.ops import packed_attention

pytestmark = needs_triton
DT = torch.float64  # (the interpreter's exact dtype; the paths do not depend on it)


@pytest.fixture
def traced(monkeypatch):
    """The names of the kernels handed to the tracing wrapper."""
    log = []

    def tracing_wrapper(kernel):
        log.append(getattr(kernel, "__name__", repr(kernel)))
        return kernel

    monkeypatch.setattr(kernels, "_torch_wrap_triton", tracing_wrapper)
    monkeypatch.setattr(kernels, "_interpreted", lambda kernel: False)
    return log


def _rand(*shape, device, grad=True):
    return torch.randn(*shape, device=device, dtype=DT, requires_grad=grad)


def _attention(device):
    q, k, v = (_rand(2, 5, 2, 16, device=device) for _ in range(3))
    ek, ev = _rand(2, 2, 16, device=device), _rand(2, 2, 16, device=device)
    xclip_fast.attention(q, k, v, ek, ev, backend="triton").sum().backward()
    xclip_fast.attention(q, k, v, backend="triton").sum().backward()


def _packed(device):
    qkv, extra = _rand(5, 2, 3, 2, 16, device=device).transpose(0, 1), _rand(2, 2, 2, 16, device=device)
    packed_attention(qkv, extra, backend="triton").sum().backward()


def _quick_gelu(device):
    h = _rand(4, 8, device=device)
    quick_gelu(h, "triton").sum().backward()
    w1, w2 = _rand(16, 8, device=device), _rand(8, 16, device=device)
    quick_gelu_mlp(h, w1, None, w2, None, backend="triton").sum().backward()
    with torch.no_grad():
        quick_gelu_mlp(h, w1, None, w2, None, backend="triton")


def _block(level):
    def run(device):
        block = CrossFrameAttentionBlock(32, 2, T=2, backend="triton", recompute=level).to(device, DT)
        x = _rand(5, 4, 32, device=device)
        block(x).sum().backward()
        with torch.no_grad():
            block(x)
        mit = ResidualAttentionBlock(32, 2, backend="triton", recompute=level).to(device, DT)
        mit(_rand(3, 2, 32, device=device)).sum().backward()
    return run


def _transforms(device):
    k, v = _rand(2, 5, 2, 16, device=device, grad=False), _rand(2, 5, 2, 16, device=device, grad=False)
    qs = _rand(3, 2, 5, 2, 16, device=device, grad=False)

    def f(q):
        return xclip_fast.attention(q, k, v, backend="triton").sum()
    torch.func.vmap(lambda q: xclip_fast.attention(q, k, v, backend="triton"))(qs)
    torch.func.grad(f)(qs[0])
    torch.func.vmap(torch.func.grad(f))(qs)  # per-sample gradients
    torch.func.jacrev(lambda q: xclip_fast.attention(q, k, v, backend="triton")[0, 0, 0, :2])(qs[0])


def _kernels_alone(device):
    from xclip_fast.bench.gputime import CPUTimer, GraphTimer
    from xclip_fast.bench.kernels import ATTENTION_KERNELS, problems, time_kernels

    timer = GraphTimer(device, rounds=1, replays=1, warmup=1) if device.type == "cuda" else CPUTimer(rounds=1)
    time_kernels(problems(2, 5, 2, 16, DT, device, extra=True), ATTENTION_KERNELS, timer, device)
    time_kernels(problems(3, 5, 2, 16, DT, device, extra=False), ATTENTION_KERNELS, timer, device)  # packed


def _compiled(device):
    block = CrossFrameAttentionBlock(32, 2, T=2, backend="triton").to(device, DT)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled(_rand(5, 4, 32, device=device)).sum().backward()
    torch._dynamo.reset()


PATHS = {"attention": _attention, "packed": _packed, "quick_gelu": _quick_gelu,
         **{f"block-{level}": _block(level) for level in ("none", "lean", "min", "block")},
         "transforms": _transforms, "kernels-alone": _kernels_alone, "compiled": _compiled}


@pytest.mark.parametrize("path", list(PATHS))
def test_no_eager_launch_is_traced(traced, path, device):
    with record_launches() as launches:
        PATHS[path](device)
    assert launches, f"{path}: our kernels never ran (the path proves nothing)"
    assert traced == [], f"{path}: launched through the tracing wrapper: {sorted(set(traced))}"


def test_a_trace_gets_the_tracing_wrapper(traced):
    """The recorder sees what it must: under a dispatch mode (a trace) the wrapper is handed out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from xclip_fast.kernels.attention import _sequence_fwd_kernel

    assert kernels.wrap_triton(_sequence_fwd_kernel) is _sequence_fwd_kernel and traced == []
    with FakeTensorMode():
        kernels.wrap_triton(_sequence_fwd_kernel)
    assert traced == ["_sequence_fwd_kernel"]


def test_the_launch_host_benchmark_reports_every_level(tmp_path):
    """benchmarks/launch_host.py runs (one process, one round) and writes its table."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "launch_host.py"
    proc = subprocess.run([sys.executable, str(script), "--processes", "1", "--rounds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    for level in ("none", "lean", "min", "block"):
        for step in ("train", "infer"):
            assert f"| {level} | {step} | " in table
