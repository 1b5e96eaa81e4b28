"""Helpers shared by the tests: relative-error assertions, tiny Hugging Face models, the triton marker
(the float64 attention is ``xclip_fast.testing.attention_f64``)."""

import contextlib
import os
import sys

import pytest
import torch
import torch.distributed as dist

from xclip_fast.ops import triton_status
from xclip_fast.testing import rel_err
from xclip_fast.versions import TORCH_MIN
from xclip_fast.versions import release as versions_release


def assert_rel(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail, naming the tensor, when ``||out - ref|| / ||ref|| > tol`` (NaN or inf always fails)."""
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_grads_close(names, grads, ref_grads, tol: float, floor: float = 1e-6) -> None:
    """Every gradient against its reference, by name. Some gradients are exactly zero in exact
    arithmetic (a key bias shifts a whole softmax row; in layer 0 every frame's class token is the
    same, so the message attention is uniform): what is computed for them is rounding noise. Each
    error is therefore measured against the larger of the gradient's norm and ``floor`` times the
    largest gradient norm of the set."""
    scale = floor * max(g.double().norm().item() for g in ref_grads if g is not None)
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert (g is None) == (g_ref is None), f"grad {name}: {g is None} vs reference {g_ref is None}"
        if g is None:
            continue
        assert torch.isfinite(g).all(), f"grad {name} is not finite"
        g, g_ref = g.detach().double().cpu(), g_ref.detach().double().cpu()  # (either may be on a GPU)
        err = (g - g_ref).norm().item() / max(g_ref.norm().item(), scale)
        assert err <= tol, f"grad {name}: relative error {err:.3e} > {tol:.1e}"


def param_grad_errors(module, ref_module):
    """(name, fast grad, reference grad) for every parameter, by name."""
    ref_params = dict(ref_module.named_parameters())
    return [(name, p.grad, ref_params[name].grad) for name, p in module.named_parameters()]


def spawn_results(worker, world: int, tmp_path_factory, name: str, *args):
    """Run ``worker(rank, world, store, out_path, *args)`` on ``world`` processes (each initialises
    gloo on the file ``store``) and return what rank 0 saved to ``out_path`` (``torch.save``)."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp(f"{name}{world}")
    out = folder / "results.pt"
    mp.spawn(worker, args=(world, str(folder / "store"), str(out), *args), nprocs=world, join=True)
    return torch.load(out)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store: str):
    """The body of a spawned worker, in a gloo process group initialised on the file ``store``.

    When the body succeeds, every rank waits for the others, leaves the group and ends its process
    at once, without the interpreter's teardown: there a DDP reducer freed with the worker's locals
    destroys the group while gloo's thread still drops a finished collective that holds Python state
    (the thread waits for the GIL that the destructor holds while it joins the thread: the process
    hangs, or aborts with "terminate called without an active exception", as seen on torch 2.13).
    A body that raises leaves the group and lets the spawn report the error."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)  # one thread a process, as torchrun sets: the ranks share the machine's cores
    try:
        yield
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cpu_mesh():
    """A one-dimensional CPU device mesh over the group's ranks, for ``fully_shard(..., mesh=)``.
    Named because FSDP2's default mesh takes the machine's accelerator: with a GPU present, CPU
    processes on a gloo group would shard onto a CUDA mesh (a worker crashed with SIGSEGV so)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def error_messages(cases: dict) -> dict:
    """``"<exception type>: <message>"`` of each case's call (None if it raised nothing), by name, with
    the exception's notes on the lines after: what a spawned worker sends back for the test to check."""
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except (ValueError, TypeError, RuntimeError) as exc:
            out[name] = "\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())])
    return out


def tiny_xclip_config(num_frames: int = 3, attn_implementation: str = "eager", **vision):
    """A tiny random Hugging Face X-CLIP configuration, built offline.

    ``"eager"`` attention computes its softmax in float32 even in float64 models (an fp32-accurate
    oracle); ``"sdpa"`` keeps float64 throughout (an exact oracle in float64)."""
    from transformers import XCLIPConfig

    vision_config = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         mit_hidden_size=32, mit_intermediate_size=128, mit_num_hidden_layers=1,
                         mit_num_attention_heads=2, image_size=32, patch_size=8, num_frames=num_frames)
    vision_config.update(vision)
    config = XCLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=vision_config, projection_dim=vision_config["mit_hidden_size"], prompt_layers=1,
        prompt_num_attention_heads=2,
    )
    # must be set before the model is built: it does not reach the MIT's private config copy later
    config._attn_implementation = attn_implementation
    return config


def tiny_xclip(dtype=torch.float32, num_frames: int = 3, attn_implementation: str = "eager", **vision):
    from transformers import XCLIPModel

    torch.manual_seed(0)
    return XCLIPModel(tiny_xclip_config(num_frames, attn_implementation, **vision)).to(dtype).eval()


# the triton backend where it can run (CUDA, or the CPU interpreter); conftest skips the marked
# tests with the reason elsewhere
needs_triton = pytest.mark.triton
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
TRITON_OK = triton_status()[0]
# the processes of the distributed tests run on CPU: the triton backend there needs the interpreter
TRITON_CPU_OK, TRITON_CPU_WHY = triton_status("cpu")
# CI runs the suite under two releases (xclip_fast.versions.TESTED). A few torch.compile checks are
# expensive on a cold compile cache and come in two variants that exercise the same machinery: each
# variant runs under one of the releases (a visible skip under the other), so that both releases
# compile that path and every variant is checked, within CI's time.
OLDEST = versions_release(torch.__version__) == TORCH_MIN


def one_release(param, which: str):
    """``param`` (a value or a ``pytest.param``) run under the ``which`` ("oldest"/"newest") release only."""
    run = OLDEST if which == "oldest" else not OLDEST
    mark = pytest.mark.skipif(not run, reason=f"an expensive compiled variant, checked under the {which} supported "
                              "release (CI runs the suite under both; the other variant runs here)")
    if isinstance(param, type(pytest.param(None))):
        return pytest.param(*param.values, marks=[*param.marks, mark], id=param.id)
    return pytest.param(param, marks=mark)


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
