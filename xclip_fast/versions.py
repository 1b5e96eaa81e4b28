"""The torch and triton releases xclip-fast supports, checked when the package is imported.

Supported means what CI runs the whole test suite on, twice: the oldest pair we claim (torch 2.11 with
the triton 3.6 its wheels pin, also the GPU machine's versions) and the newest releases (torch 2.15
with the triton 3.9 its wheels pin). Older releases are refused at import with a message that says
what to install, instead of failing later in some obscure way; newer ones are allowed (a library
that caps torch makes pip downgrade it), but untested until CI runs them.

Workarounds for a bug of one supported release live here, each with the release it is for.
"""

from __future__ import annotations

import re

import torch

__all__ = ["TORCH_MIN", "TRITON_MIN", "TESTED", "release", "version_problems", "check_versions",
           "compiled_cpu_fp64_sdpa_is_broken"]

TORCH_MIN = (2, 11)
TRITON_MIN = (3, 6)  # the triton that torch 2.11's wheels pin
# the releases CI runs the test suite on (.ci/run): the oldest supported pair and the newest
TESTED = {"torch": ("2.11", "2.15"), "triton": ("3.6", "3.9")}


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``2.11.0+cu130`` or ``3.7.0a0+git1234``."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"cannot read a release from the version string {version!r}")
    return int(match.group(1)), int(match.group(2))


def _too_old(name: str, found: str, minimum: tuple[int, int], hint: str = "") -> str:
    need = ".".join(map(str, minimum))
    return (f"xclip-fast needs {name} >= {need} (tested with {name} {' and '.join(TESTED[name])}); this "
            f"environment has {name} {found}. Upgrade it: pip install '{name}>={need}'{hint}")


def version_problems(torch_version: str, triton_version: str | None) -> list[str]:
    """What is wrong with these versions (empty when both are supported). ``triton_version`` is None
    where triton is not installed: the torch backend still runs (triton_status says why not triton)."""
    problems = []
    if release(torch_version) < TORCH_MIN:
        problems.append(_too_old("torch", torch_version, TORCH_MIN))
    if triton_version is not None and release(triton_version) < TRITON_MIN:
        problems.append(_too_old("triton", triton_version, TRITON_MIN,
                                 " (or upgrade torch: its CUDA wheels pin their triton)"))
    return problems


def _installed_triton() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or broken: ops.triton_status reports why the triton backend is off
        return None
    return triton.__version__


def check_versions() -> None:
    """Raise ImportError naming what to install when torch or triton is older than supported; apply the
    workarounds that the installed releases need."""
    triton_version = _installed_triton()
    problems = version_problems(str(torch.__version__), triton_version)
    if problems:
        raise ImportError("\n".join(problems))
    if triton_version is not None and release(triton_version) < (3, 7):
        _fix_interpreter_index()


def _fix_interpreter_index() -> None:
    """Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) turns a kernel's scalar argument into a
    Python int with ``int()`` of a one-element array, which NumPy 2.4 and newer refuse ("only
    0-dimensional arrays can be converted to Python scalars"). Every loop whose bound is a runtime
    argument (``for start_n in range(0, G * SK, BLOCK_N)``) then fails under the interpreter, whatever
    the kernel is: no way of writing the loop avoids it, and the compiled kernels are not affected.
    Triton 3.7 reads the element instead (triton-lang/triton#9171); this does the same for 3.6, by
    wrapping the function with which the interpreter installs its tensor methods at every launch."""
    from triton.runtime import interpreter

    install = getattr(interpreter, "_patch_lang_tensor", None)
    if install is None or getattr(install, "xclip_fast_fixed", False):
        return

    def install_fixed(tensor, scope):
        install(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    install_fixed.xclip_fast_fixed = True
    interpreter._patch_lang_tensor = install_fixed


_TORCH_BEFORE_2_13 = release(str(torch.__version__)) < (2, 13)


def compiled_cpu_fp64_sdpa_is_broken(q) -> bool:
    """True where ``scaled_dot_product_attention`` on float64 CPU tensors must not be traced by
    ``torch.compile``. In torch 2.11 and 2.12 the fake implementation of the CPU flash kernel says its
    log-sum-exp is float32 whatever the input dtype, while the kernel returns float64 for float64
    inputs; Inductor then copies that float64 log-sum-exp into a float32 buffer and the backward kernel
    stops with "expected scalar type Double but found Float". torch 2.13 derives the dtype from the
    input (fixed). The caller writes the attention out instead in that one case (same values)."""
    return (_TORCH_BEFORE_2_13 and q.dtype == torch.float64 and q.device.type == "cpu"
            and torch.compiler.is_compiling())
