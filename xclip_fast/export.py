"""Deployable artifacts of the video encoder: a PyTorch 2 package (``.pt2``) and an ONNX model.

Both hold :class:`~xclip_fast.encoder.XCLIPVideoEncoder`'s forward, ``video (b, T, 3, H, W) ->
video_embeds (b, E)`` (float32 out), with the batch b and the frame count T dynamic within the ranges
given at export. Neither needs this package to run:

- ``.pt2`` (``torch.export`` + AOTInductor): ``torch._inductor.aoti_load_package(path)`` with torch
  alone; compiled for the device it is exported on (CPU: this CPU's instruction set, recorded as
  ``AOTI_CPU_ISA``; CUDA: the Triton kernels are to be compiled into the package, not yet run on a
  GPU). PyTorch checks a package's inputs (shape ranges, the fixed dims, dtype, strides) only when
  ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set before the first call; without it an input outside the
  exported shapes is not refused and gives wrong numbers. Set it (the loading snippet of docs/deploy.md does).
- ``.onnx`` (the dynamo exporter, the torch backend's graph): any ONNX runtime; ONNX Runtime checks
  the fixed dims and the dtype itself. ONNX has no way to state the frame range: T outside it runs
  (the graph holds for any T), it is only untested there.

Metadata (``.pt2``: ``package.get_metadata()``; ONNX: ``metadata_props``) holds the input conventions
as strings under ``xclip_fast.*`` keys: resolution, layout, frame and batch ranges, whether the input
is ``uint8`` RGB 0-255 (normalised inside the artifact) or normalised floats, mean/std, the weights'
dtype and the model configuration (JSON).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import torch
from torch import nn

from xclip_fast.blocks import is_int
from xclip_fast.dtypes import dtype_name
from xclip_fast.video import MEAN, STD

__all__ = ["FORMATS", "INPUTS", "Exported", "export_encoder", "read_metadata", "format_of"]

FORMATS = ("pt2", "onnx")
INPUTS = ("float", "uint8")
SCHEMA = "xclip-fast-export/1"
CHECKS_ENV = "AOTI_RUNTIME_CHECK_INPUTS"


@dataclass
class Exported:
    """What :func:`export_encoder` wrote: the file, its format, size in bytes and metadata."""

    path: str
    format: str
    dtype: torch.dtype
    bytes: int
    metadata: dict


class _Serving(nn.Module):
    """The artifact's forward: the encoder's video embedding, returned as float32."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video).float()


def format_of(path: str, format: str | None = None) -> str:
    """The artifact format: ``format`` if given, else from the file name (``.pt2`` / ``.onnx``). A
    name that says the other format (``format="onnx"`` for ``m.pt2``) is refused: whoever loads the
    file by its name would take it for what it is not."""
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown export format {format!r}; choose one of {FORMATS}")
        if ext in FORMATS and ext != format:
            raise ValueError(f"{path}: the name says .{ext} but the format is {format}; name the file *.{format}")
        return format
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the format from {path!r}: name the file *.pt2 or *.onnx (or give format=)")
    return ext


def _peft_attention(encoder: nn.Module) -> str | None:
    """The name of a PEFT adapter layer on an ``nn.MultiheadAttention`` in ``encoder`` (None if none):
    it swaps the module's weights for merged ones inside its forward, which ``torch.export`` cannot
    trace (it fails deep inside, on a fake tensor among the program's constants)."""
    for name, m in encoder.named_modules():
        if type(m).__module__.startswith("peft.") and isinstance(getattr(m, "base_layer", None),
                                                                  nn.MultiheadAttention):
            return name
    return None


def _check_range(name: str, span) -> tuple[int, int]:
    if (not isinstance(span, (tuple, list)) or len(span) != 2 or not all(is_int(v) for v in span)
            or not 1 <= span[0] <= span[1]):
        raise ValueError(f"{name} must be (min, max) ints with 1 <= min <= max, got {span!r}")
    return int(span[0]), int(span[1])


def metadata(encoder, fmt: str, dtype: torch.dtype, input: str, batch: tuple, frames: tuple) -> dict:
    """The input conventions written into an artifact (strings: both formats store str -> str)."""
    from xclip_fast import __version__

    cfg = encoder.config
    r = cfg["input_resolution"]
    meta = {
        "xclip_fast.schema": SCHEMA,
        "xclip_fast.version": __version__,
        "xclip_fast.torch": torch.__version__,
        "xclip_fast.format": fmt,
        "xclip_fast.input": "video",
        "xclip_fast.layout": f"(batch, frames, 3, {r}, {r}): RGB channels, frames in time order, contiguous",
        "xclip_fast.resolution": str(r),
        "xclip_fast.batch": f"{batch[0]}..{batch[1]}",
        "xclip_fast.frames": f"{frames[0]}..{frames[1]}",
        "xclip_fast.input_dtype": "uint8" if input == "uint8" else "float32",
        "xclip_fast.normalised_inside": "yes" if input == "uint8" else "no",
        "xclip_fast.mean": json.dumps(list(MEAN)),
        "xclip_fast.std": json.dumps(list(STD)),
        "xclip_fast.normalisation": ("(x - mean) / std per channel on 0-255 values; uint8 input: done inside"
                                     if input == "uint8" else "(x - mean) / std per channel on 0-255 values: "
                                     "give normalised frames"),
        "xclip_fast.output": f"video_embeds (batch, {cfg['embed_dim']}) float32",
        "xclip_fast.weights_dtype": dtype_name(dtype),
        "xclip_fast.trained_frames": str(cfg["num_frames"]),
        "xclip_fast.config": json.dumps(cfg, sort_keys=True),
    }
    if fmt == "pt2":
        meta["xclip_fast.input_checks"] = f"set {CHECKS_ENV}=1 before the first call (PyTorch's checks of ranges, " \
                                          "fixed dims, dtype and strides)"
    return meta


def export_encoder(encoder: nn.Module, path: str, *, format: str | None = None, dtype: torch.dtype | None = None,
                   input: str = "float", batch=(1, 64), frames=(1, 256), device=None) -> Exported:
    """Write ``encoder`` (an :class:`~xclip_fast.encoder.XCLIPVideoEncoder`) as one deployable file.

    Args:
        encoder: the encoder with its weights (any weight source); left unchanged (a copy is exported).
        path: the file; its name picks the format unless ``format`` is given.
        format: ``"pt2"`` (``torch.export`` + AOTInductor) or ``"onnx"`` (dynamo exporter).
        dtype: the weights' dtype in the artifact (float32, float16, bfloat16; default: the
            encoder's). ONNX Runtime's CPU provider has no bf16 kernels: bf16 is refused for ONNX.
        input: ``"float"`` (normalised frames, float32) or ``"uint8"`` (raw RGB 0-255, normalised
            inside the artifact as :func:`xclip_fast.encoder.as_frames` does).
        batch, frames: ``(min, max)`` of the dynamic batch and frame count.
        device: ``"cpu"`` or ``"cuda"`` (``.pt2`` only: the package runs on the device it was
            compiled for; default: the encoder's). The encoder's backend is used: on CUDA the Triton
            kernels end up compiled into the package; ONNX always exports the torch backend.

    Returns:
        :class:`Exported` (path, format, dtype, size in bytes, metadata).

    Raises:
        ValueError: an unknown format, input or dtype, a bad range, an encoder other than
            XCLIPVideoEncoder, ONNX with bf16 or on CUDA, the ``reference`` backend (not exportable
            with dynamic T).
    """
    from xclip_fast.encoder import XCLIPVideoEncoder

    if not isinstance(encoder, XCLIPVideoEncoder):
        raise ValueError(f"export_encoder takes an XCLIPVideoEncoder, got {type(encoder).__name__}")
    fmt = format_of(path, format)
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
    batch, frames = _check_range("batch", batch), _check_range("frames", frames)
    weight = next(encoder.parameters())
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = weight.device if device is None else torch.device(device)
    if fmt == "onnx" and dtype == torch.bfloat16:
        raise ValueError("ONNX with bfloat16 weights: ONNX Runtime's CPU provider has no bf16 kernels; export "
                         "float32 or float16, or a .pt2 package for bf16")
    if fmt == "onnx" and device.type != "cpu":
        raise ValueError("ONNX exports the torch backend's graph on the CPU (device='cpu'); the runtime "
                         "chooses where it runs")
    adapter = _peft_attention(encoder)
    if adapter is not None:
        raise ValueError(f"{adapter} is a PEFT LoRA adapter on an nn.MultiheadAttention, which torch.export cannot "
                         "trace; merge the adapters into the weights first (peft_model.merge_and_unload()) and export "
                         "the merged encoder")
    if encoder.backend == "reference" and fmt == "pt2":
        raise ValueError("the 'reference' backend builds T into the modules; export the 'torch', 'triton' or "
                         "'auto' backend")
    import copy

    model = copy.deepcopy(encoder).to(device=device, dtype=dtype).eval()
    if fmt == "onnx" or device.type == "cpu":
        model.backend = "torch"  # the Triton kernels run on CUDA only; ONNX has no place for them
    r = model.config["input_resolution"]
    # sizes >= 2 where the range allows (torch.export traces 0 and 1 as special cases); a one-value
    # range gives its value
    example_T = min(max(2, frames[0]), frames[1])
    example_b = min(max(2, batch[0]), batch[1])
    example = (torch.randint(0, 256, (example_b, example_T, 3, r, r), dtype=torch.uint8, device=device)
               if input == "uint8" else torch.randn(example_b, example_T, 3, r, r, device=device))
    # a dim whose range is one value is static (torch.export refuses a Dim with min == max)
    dims = {k: torch.export.Dim(name, min=span[0], max=span[1])
            for k, name, span in ((0, "batch", batch), (1, "frames", frames)) if span[0] < span[1]}
    meta = metadata(model, fmt, dtype, input, batch, frames)
    serving = _Serving(model).eval()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # written beside its final name and renamed into place on success: a failure (a compiler error,
    # a full disk, a kill) leaves a previous artifact of that name untouched
    tmp = os.path.join(folder, f".{os.path.basename(str(path))}.xclip-fast-tmp-{uuid.uuid4().hex}.{fmt}")
    try:
        with torch.no_grad():
            if fmt == "pt2":
                _write_pt2(serving, example, dims, meta, tmp)
            else:
                _write_onnx(serving, example, dims, meta, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return Exported(str(path), fmt, dtype, os.path.getsize(path), meta)


def _write_pt2(serving, example, dims, meta, path) -> None:
    program = torch.export.export(serving, (example,), dynamic_shapes=(dims,))
    configs = {
        "aot_inductor.metadata": meta,
        # the shape checks (AOTI_RUNTIME_CHECK_INPUTS=1) would otherwise refuse a dynamic dim of 1
        # (torch.export traces sizes >= 2 as the general case; the graph is valid for 1 as well,
        # which the parity tests check at batch 1 and one frame)
        "aot_inductor.check_lowerbound": False,
    }
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)


def _write_onnx(serving, example, dims, meta, path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({exc}): pip install 'xclip-fast[export]'") \
            from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        program = torch.onnx.export(serving, (example,), dynamo=True, dynamic_shapes=(dims,),
                                    input_names=["video"], output_names=["video_embeds"])
    proto = program.model_proto
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    import onnx

    onnx.save(proto, str(path))


def read_metadata(path: str) -> dict:
    """The ``xclip_fast.*`` metadata of an artifact (a ``.pt2`` is loaded to read it; ONNX needs
    ``onnx``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a name that is neither ``*.pt2`` nor ``*.onnx``, a file that cannot be read as
            its format (empty, cut, another kind of file), or one without this library's metadata;
            each message names the file.
    """
    fmt = format_of(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if fmt == "pt2":
            meta = torch._inductor.aoti_load_package(str(path)).get_metadata()
        else:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except ImportError:
        raise
    except Exception as exc:  # (the loaders raise RuntimeError, DecodeError, ...: say which file)
        raise ValueError(f"{path}: not a readable .{fmt} file ({type(exc).__name__}: {str(exc).strip()})") from None
    meta = {k: v for k, v in meta.items() if k.startswith("xclip_fast.")}
    if meta.get("xclip_fast.schema") != SCHEMA:
        raise ValueError(f"{path}: not an xclip-fast artifact (no {SCHEMA} metadata; written by export_encoder or "
                         "xclip-fast export)")
    return meta
