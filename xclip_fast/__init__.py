"""xclip-fast: fast, lean, drop-in X-CLIP video encoder modules on Triton kernels.

Public API: :func:`attention`, :class:`CrossFrameAttentionBlock` (also exported under the official
spelling ``CrossFramelAttentionBlock``), :class:`ResidualAttentionBlock`, :class:`XCLIPVideoEncoder`,
:class:`FrameParallel` (one clip's frames over several processes); ``xclip_fast.reference`` holds the
original modules, the ground truth of the tests.
"""

import importlib.util as _ilu
import os as _os
import sys as _sys

from xclip_fast.versions import check_versions as _check_versions

# before anything uses torch or triton: older releases than supported are refused here, clearly
_check_versions()


def _map_checkout_kernels() -> None:
    # setup.py installs the top-level folder kernels/ as the subpackage xclip_fast.kernels
    # (package_dir). When the package is used straight from a source checkout without being
    # installed, map that same name onto the folder so imports work the same way.
    if _ilu.find_spec("xclip_fast.kernels") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if _os.path.isfile(init):
        spec = _ilu.spec_from_file_location("xclip_fast.kernels", init, submodule_search_locations=[folder])
        module = _ilu.module_from_spec(spec)
        _sys.modules["xclip_fast.kernels"] = module
        spec.loader.exec_module(module)


_map_checkout_kernels()

from xclip_fast.blocks import (  # noqa: E402
    CrossFrameAttentionBlock,
    CrossFramelAttentionBlock,
    ResidualAttentionBlock,
)
from xclip_fast.encoder import XCLIPVideoEncoder  # noqa: E402
from xclip_fast.hf import patch_xclip, unpatch_xclip  # noqa: E402
from xclip_fast.ops import attention, triton_status  # noqa: E402
from xclip_fast.parallel import FrameParallel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "attention",
    "triton_status",
    "CrossFrameAttentionBlock",
    "CrossFramelAttentionBlock",
    "ResidualAttentionBlock",
    "XCLIPVideoEncoder",
    "FrameParallel",
    "patch_xclip",
    "unpatch_xclip",
]
