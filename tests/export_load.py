"""Load an exported ``.pt2`` package the way a service would, with torch alone (run as a script).

Any import of ``xclip_fast`` fails here, so a package that needed this library's Python code would
fail to load or run. ``AOTI_RUNTIME_CHECK_INPUTS=1`` turns on PyTorch's checks of the inputs.
Usage: ``export_load.py PACKAGE INPUTS.pt RESULTS.pt``: INPUTS holds a list of tensors; RESULTS gets,
per input, the output or the error message, plus the package's metadata and the modules loaded.
"""

import os
import sys


class _NoXclipFast:
    def find_spec(self, name, path=None, target=None):
        if name == "xclip_fast" or name.startswith("xclip_fast."):
            raise ImportError(f"{name} imported while loading an exported package")
        return None


sys.meta_path.insert(0, _NoXclipFast())
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"

import torch  # noqa: E402


def main(package: str, inputs: str, results: str) -> None:
    model = torch._inductor.aoti_load_package(package)
    outputs = []
    for x in torch.load(inputs):
        try:
            outputs.append(model(x))
        except Exception as exc:  # the refusal is the result
            outputs.append(f"{type(exc).__name__}: {exc}")
    torch.save({"outputs": outputs, "metadata": model.get_metadata(),
                "xclip_fast_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "xclip_fast")}, results)


if __name__ == "__main__":
    main(*sys.argv[1:4])
