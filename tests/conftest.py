"""Test setup: Triton's CPU interpreter when there is no GPU, NaN-poisoned allocations, fixed seeds."""

import math
import os

import torch

# Triton reads TRITON_INTERPRET when it is imported: decide before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _traced(t) -> bool:
    """Whether ``t`` is made while a graph is traced (torch.compile, export, make_fx): a fill there
    would be recorded into the graph, and an in-place fill of a buffer made inside a backward graph
    is refused by AOTAutograd ("n=copy_..., n.args[0]=empty..."), as the suite on a GPU showed."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if (t.is_floating_point() or t.is_complex()) and not _traced(t):
            with torch.no_grad():
                t.fill_(math.nan)
        return t

    wrapper.__wrapped__ = fn
    return wrapper


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: needs the triton backend (CUDA, or the CPU interpreter); "
                                       "skipped with the reason where it cannot run")


def pytest_collection_modifyitems(config, items):
    from xclip_fast.ops import triton_status

    ok, why = triton_status()
    if not ok:
        skip = pytest.mark.skip(reason=f"triton backend unavailable: {why}")
        for item in items:
            if item.get_closest_marker("triton") is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def nan_poisoned_empty():
    """Every ``torch.empty*`` allocation starts as NaN, so an output element a kernel forgets to
    write shows up as NaN instead of as plausible leftover memory."""
    names = ("empty", "empty_like", "empty_strided")
    saved = {name: getattr(torch, name) for name in names}
    for name in names:
        setattr(torch, name, _poisoned(saved[name]))
    yield
    for name, fn in saved.items():
        setattr(torch, name, fn)


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True, scope="session")
def own_auto_cache(tmp_path_factory):
    """The suite never reads or writes the user's ``backend="auto"`` cache (xclip_fast.autochoice): its
    own empty folder, for every process it starts too (the variable is inherited)."""
    import os

    from xclip_fast import autochoice

    saved = os.environ.get(autochoice.CACHE_ENV)
    os.environ[autochoice.CACHE_ENV] = str(tmp_path_factory.mktemp("auto-cache"))
    autochoice.forget()
    yield
    if saved is None:
        os.environ.pop(autochoice.CACHE_ENV, None)
    else:
        os.environ[autochoice.CACHE_ENV] = saved
