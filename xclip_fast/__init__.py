"""xclip-fast: fast, lean, drop-in X-CLIP video encoder modules on Triton kernels.

Public API: :func:`attention`, :class:`CrossFrameAttentionBlock` (also exported under the official
spelling ``CrossFramelAttentionBlock``), :class:`ResidualAttentionBlock`, :class:`XCLIPVideoEncoder`,
:class:`FrameParallel` (one clip's frames over several processes); ``xclip_fast.reference`` holds the
original modules, the ground truth of the tests.
"""

from xclip_fast.versions import check_versions as _check_versions

# before anything uses torch or triton: older releases than supported are refused here, clearly
_check_versions()

from xclip_fast.autochoice import tune  # noqa: E402
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
    "tune",
    "CrossFrameAttentionBlock",
    "CrossFramelAttentionBlock",
    "ResidualAttentionBlock",
    "XCLIPVideoEncoder",
    "FrameParallel",
    "patch_xclip",
    "unpatch_xclip",
]
