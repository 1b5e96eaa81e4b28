"""The supported torch and triton releases: what setup.py, the README and CI say agrees with
xclip_fast.versions, older releases are refused at import with a message that says what to install,
and the workaround for triton 3.6's interpreter lets a kernel loop over a runtime bound."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xclip_fast import versions
from xclip_fast.versions import TESTED, TORCH_MIN, TRITON_MIN, release, version_problems

ROOT = Path(__file__).resolve().parents[1]


def _dotted(r):
    return ".".join(map(str, r))


@pytest.mark.parametrize("text, expected", [("2.11.0", (2, 11)), ("2.11.0+cu130", (2, 11)), ("2.13.0+cpu", (2, 13)),
                                            ("2.14.0a0+git1234", (2, 14)), ("3.6.0", (3, 6)), ("10.0", (10, 0))])
def test_release_reads_major_and_minor(text, expected):
    assert release(text) == expected


def test_release_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="cannot read a release"):
        release("unknown")


def test_supported_versions_have_no_problem():
    for t in TESTED["torch"]:
        for tr in TESTED["triton"]:
            assert version_problems(f"{t}.0", f"{tr}.0") == []
    assert version_problems("2.11.0+cu130", None) == []  # no triton: the torch backend runs


@pytest.mark.parametrize("torch_v, triton_v, bad", [("2.10.1", "3.6.0", ["torch"]), ("2.11.0", "3.5.1", ["triton"]),
                                                    ("2.4.0", "3.0.0", ["torch", "triton"]),
                                                    ("2.9.1+cu128", None, ["torch"])])
def test_older_releases_are_named_with_what_to_install(torch_v, triton_v, bad):
    problems = version_problems(torch_v, triton_v)
    assert len(problems) == len(bad)
    for name, text in zip(bad, problems):
        found = torch_v if name == "torch" else triton_v
        minimum = _dotted(TORCH_MIN if name == "torch" else TRITON_MIN)
        assert f"needs {name} >= {minimum}" in text and f"has {name} {found}" in text
        assert f"pip install '{name}>={minimum}'" in text
        assert " and ".join(TESTED[name]) in text


@pytest.mark.parametrize("module, old", [("torch", "2.10.0"), ("triton", "3.5.0")])
def test_import_refuses_an_older_release(module, old):
    """A fresh interpreter whose torch (or triton) claims an older release: importing xclip_fast stops
    at once with the message, not later in some obscure way."""
    code = (f"import {module}; {module}.__version__ = {old!r}\n"
            "try:\n    import xclip_fast\nexcept ImportError as e:\n    print('REFUSED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED"), proc.stdout
    assert f"has {module} {old}" in proc.stdout


def test_setup_readme_and_ci_state_what_versions_checks():
    """One range everywhere: setup.py's lower bounds are the minimums, CI installs exactly the tested
    releases (the oldest pair and the newest), and the README names them."""
    setup = (ROOT / "setup.py").read_text()
    assert f'"torch>={_dotted(TORCH_MIN)}"' in setup
    assert f'"triton>={_dotted(TRITON_MIN)}; ' in setup
    assert (TESTED["torch"][0], TESTED["triton"][0]) == (_dotted(TORCH_MIN), _dotted(TRITON_MIN))
    ci = (ROOT / ".ci" / "run").read_text()
    pins = {name: set(re.findall(rf'"{name}==(\d+\.\d+)\.\d+"', ci)) for name in ("torch", "triton")}
    assert pins == {name: set(TESTED[name]) for name in ("torch", "triton")}, pins
    readme = (ROOT / "README.md").read_text()
    for name in ("torch", "triton"):
        assert f"{name} {TESTED[name][0]} and {TESTED[name][1]}" in readme, name


def test_interpreter_runs_a_loop_over_a_runtime_bound():
    """Triton 3.6's interpreter with NumPy >= 2.4 failed on every loop bounded by a kernel argument;
    the workaround in xclip_fast.versions makes it run (3.7 and newer need none). The loop counts its
    trips: G * N / BLOCK, rounded up."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("checks Triton's CPU interpreter (TRITON_INTERPRET=1 without CUDA)")

    @triton.jit
    def count_trips(out, N, G, BLOCK: tl.constexpr):
        trips = 0
        for _ in range(0, G * N, BLOCK):
            trips += 1
        tl.store(out, trips)

    for n, g, block in ((10, 3, 4), (7, 1, 8), (64, 2, 16)):
        out = torch.zeros(1, dtype=torch.int32)
        count_trips[(1,)](out, n, g, BLOCK=block)
        assert out.item() == -(-g * n // block)
    if release(triton.__version__) < (3, 7):
        from triton.runtime import interpreter

        assert getattr(interpreter._patch_lang_tensor, "xclip_fast_fixed", False)


def test_compiled_fp64_sdpa_workaround_is_limited_to_the_buggy_releases():
    """Outside torch.compile, or on another dtype, SDPA runs as usual whatever the release."""
    q = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    assert not versions.compiled_cpu_fp64_sdpa_is_broken(q)  # eager
    broken = versions.compiled_cpu_fp64_sdpa_is_broken
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def probe(x):
        seen.append((broken(x), broken(x.float())))
        return x + 1

    probe(q)
    assert seen == [(release(str(torch.__version__)) < (2, 13), False)]
