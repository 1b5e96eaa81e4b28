"""Deployable artifacts (``xclip_fast.export``, ``xclip-fast export``): a ``.pt2`` package and an ONNX
model of the video encoder against the Python encoder in float64, at several batch sizes and frame
counts of one artifact, their metadata, their refusal of inputs outside the exported shapes, and the
package loading with torch alone."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _helpers import assert_rel

from xclip_fast import XCLIPVideoEncoder
from xclip_fast.cli import main
from xclip_fast.dtypes import chosen_dtype
from xclip_fast.encoder import as_frames
from xclip_fast.export import export_encoder, read_metadata
from xclip_fast.video import MEAN, STD

HERE = os.path.dirname(os.path.abspath(__file__))
# float32 artifacts against the encoder in float64: the bar; what remains is float32 rounding
# in another order of operations (measured around 2e-7)
FP32_TOL = 1e-5


def _encoder():
    torch.manual_seed(0)
    # 64-wide heads: official files carry no head count and the loader assumes width // 64
    return XCLIPVideoEncoder(input_resolution=32, patch_size=16, width=128, layers=1, heads=2, embed_dim=64,
                             num_frames=4, mit_heads=1, backend="torch").eval()


def _truth(enc, video):
    """The Python encoder's output in float64 (uint8 frames normalised as the encoder does)."""
    ref = _encoder()
    ref.load_state_dict(enc.state_dict())
    with torch.no_grad():
        return ref.double()(as_frames(video).double())


def _video(b, T, r=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 100 + T)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (b, T, 3, r, r), generator=g, dtype=torch.uint8)
    return torch.randn(b, T, 3, r, r, generator=g).to(dtype)


def _served(path, inputs, tmp_path):
    """Run a package on ``inputs`` in another interpreter that cannot import xclip_fast, with PyTorch's
    input checks on (tests/export_load.py): its results (each output or refusal, the metadata) and stderr."""
    torch.save(inputs, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "export_load.py"), str(path), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "out.pt")
    assert res["xclip_fast_loaded"] == []  # the package never needed this library
    return res, proc.stderr


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """``xclip-fast export`` of official-format weights into a float32 .pt2 (batch 1..8, T 1..16)."""
    folder = tmp_path_factory.mktemp("pt2")
    enc = _encoder()
    weights = folder / "w.pth"
    torch.save({"model": enc.state_dict()}, weights)
    path = folder / "encoder.pt2"
    assert main(["export", "--weights", str(weights), "--out", str(path), "--dtype", "float32",
                 "--frames", "1:16", "--batch", "1:8"]) == 0
    return enc, path


def test_pt2_package_matches_the_encoder_and_loads_with_torch_alone(package, tmp_path):
    enc, path = package
    shapes = [(1, 1), (1, 4), (3, 7), (8, 16)]  # batch 1 and one frame, the trained T, others, the maxima
    inputs = [_video(b, T) for b, T in shapes]
    bad = [_video(2, 17), _video(9, 2), _video(1, 4, r=64), _video(1, 4).half(), _video(1, 4, dtype=torch.uint8)]
    res, stderr = _served(path, inputs + bad, tmp_path)
    outs = res["outputs"]
    for (b, T), x, y in zip(shapes, inputs, outs):
        assert isinstance(y, torch.Tensor), f"b={b} T={T}: {y}"
        assert y.dtype == torch.float32 and y.shape == (b, 64)
        assert_rel(f".pt2 b={b} T={T}", y, _truth(enc, x), FP32_TOL)
    errors = outs[len(shapes):]
    assert all(isinstance(e, str) for e in errors), errors
    # the reason is in the exception (torch >= 2.13) or printed by the runtime on stderr (torch 2.11)
    said = "\n".join(errors) + stderr
    assert "too large at 1, expected to be <= 16" in said  # frames beyond the exported range
    assert "too large at 0, expected to be <= 8" in said  # batch beyond it
    assert "unmatched dim value at 3, expected: 32" in said  # another resolution
    assert said.count("unmatched dtype") >= 2  # half and uint8 frames for a float32 model
    meta = res["metadata"]
    assert meta["xclip_fast.frames"] == "1..16" and meta["xclip_fast.batch"] == "1..8"
    assert meta["xclip_fast.resolution"] == "32" and meta["xclip_fast.input_dtype"] == "float32"
    assert meta["xclip_fast.normalised_inside"] == "no"
    assert json.loads(meta["xclip_fast.mean"]) == list(MEAN) and json.loads(meta["xclip_fast.std"]) == list(STD)
    assert json.loads(meta["xclip_fast.config"]) == json.loads(json.dumps(enc.config, sort_keys=True))
    assert meta["xclip_fast.weights_dtype"] == "float32"
    assert read_metadata(str(path)) == {k: v for k, v in meta.items() if k.startswith("xclip_fast.")}


def test_pt2_package_in_bfloat16_with_uint8_input(tmp_path):
    """bf16 weights, raw uint8 frames normalised inside: error against float64 no more than twice
    the Python encoder's own in bf16 (bf16 keeps 8 bits: about 4e-3 per rounding)."""
    enc = _encoder()
    done = export_encoder(enc, str(tmp_path / "bf16.pt2"), dtype=torch.bfloat16, input="uint8", batch=(1, 4),
                          frames=(2, 8))
    assert done.format == "pt2" and done.metadata["xclip_fast.weights_dtype"] == "bfloat16"
    assert done.metadata["xclip_fast.input_dtype"] == "uint8" and done.metadata["xclip_fast.normalised_inside"] == "yes"
    assert next(enc.parameters()).dtype == torch.float32  # the encoder itself is left as it was
    model = torch._inductor.aoti_load_package(done.path)
    python_bf16 = _encoder().to(torch.bfloat16)
    python_bf16.load_state_dict(enc.state_dict())
    for b, T in [(1, 2), (3, 5)]:
        x = _video(b, T, dtype=torch.uint8)
        truth = _truth(enc, x)
        with torch.no_grad():
            own = (python_bf16(x).double() - truth).norm() / truth.norm()
        y = model(x)
        assert y.dtype == torch.float32
        assert_rel(f"bf16 .pt2 b={b} T={T}", y, truth, max(2 * own.item(), 1e-3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA package is compiled and run on a GPU only")
def test_pt2_package_on_cuda_carries_the_triton_kernels(tmp_path):
    """A CUDA .pt2 of the triton backend: the attention kernels are compiled into the package (their
    names are in it), it loads and runs with torch alone, matches the float64 encoder in float32 and
    refuses frames beyond its range; in bf16 with uint8 input its error is within twice that of the
    Python encoder's own bf16 computation (the torch backend on the same GPU)."""
    import zipfile

    enc = _encoder()
    enc.backend = "triton"
    done = export_encoder(enc, str(tmp_path / "cuda.pt2"), device="cuda", batch=(1, 4), frames=(1, 8))
    with zipfile.ZipFile(done.path) as z:
        assert any(b"_sequence_fwd_kernel" in z.read(name) for name in z.namelist()), z.namelist()
    shapes = [(1, 1), (3, 7), (4, 8)]
    inputs = [_video(b, T).cuda() for b, T in shapes] + [_video(1, 9).cuda()]
    res, stderr = _served(done.path, inputs, tmp_path)
    for (b, T), x, y in zip(shapes, inputs, res["outputs"]):
        assert isinstance(y, torch.Tensor) and y.is_cuda, f"b={b} T={T}: {y}"
        assert_rel(f"CUDA .pt2 b={b} T={T}", y.cpu(), _truth(enc, x.cpu()), FP32_TOL)
    assert isinstance(res["outputs"][-1], str)
    assert "too large at 1, expected to be <= 8" in res["outputs"][-1] + stderr

    bf16 = export_encoder(enc, str(tmp_path / "bf16.pt2"), device="cuda", dtype=torch.bfloat16, input="uint8",
                          batch=(1, 4), frames=(2, 8))
    model = torch._inductor.aoti_load_package(bf16.path)
    python_bf16 = _encoder().to("cuda", torch.bfloat16)
    python_bf16.load_state_dict(enc.state_dict())
    x = _video(3, 5, dtype=torch.uint8)
    truth = _truth(enc, x)
    with torch.no_grad():
        own = ((python_bf16(x.cuda()).double().cpu() - truth).norm() / truth.norm()).item()
    assert_rel("CUDA bf16 .pt2", model(x.cuda()).cpu(), truth, max(2 * own, 1e-3))


onnx = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")


def _session(path):
    return onnx.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_model_matches_the_encoder_at_several_shapes(tmp_path):
    enc = _encoder()
    path = tmp_path / "encoder.onnx"
    assert main(["export", "--out", str(path), "--preset", "b32", "--dtype", "bfloat16"]) == 2  # no bf16 in ORT
    done = export_encoder(enc, str(path), batch=(1, 8), frames=(1, 16))
    sess = _session(path)
    (inp,) = sess.get_inputs()
    assert inp.name == "video" and inp.shape[2:] == [3, 32, 32] and all(isinstance(d, str) for d in inp.shape[:2])
    for b, T in [(1, 1), (3, 7), (8, 16)]:
        x = _video(b, T)
        (y,) = sess.run(None, {"video": x.numpy()})
        assert_rel(f"onnx b={b} T={T}", torch.from_numpy(y), _truth(enc, x), FP32_TOL)
    meta = sess.get_modelmeta().custom_metadata_map
    assert {k: v for k, v in meta.items() if k.startswith("xclip_fast.")} == done.metadata
    assert read_metadata(str(path)) == done.metadata
    with pytest.raises(Exception, match="invalid dimensions"):
        sess.run(None, {"video": _video(1, 4, r=64).numpy()})
    # a one-value range is a static dim
    export_encoder(enc, str(path), batch=(1, 1), frames=(5, 5))
    sess = _session(path)
    assert sess.get_inputs()[0].shape == [1, 5, 3, 32, 32]
    x = _video(1, 5)
    assert_rel("onnx static b=1 T=5", torch.from_numpy(sess.run(None, {"video": x.numpy()})[0]), _truth(enc, x),
               FP32_TOL)


def test_onnx_float16_weights_with_uint8_input(tmp_path):
    """fp16 weights are half the file; error against float64 within twice the Python encoder's own
    in fp16 (10 bits: about 5e-4 per rounding)."""
    enc = _encoder()
    full = export_encoder(enc, str(tmp_path / "fp32.onnx"), batch=(1, 4), frames=(1, 8))
    half = export_encoder(enc, str(tmp_path / "fp16.onnx"), dtype=torch.float16, input="uint8", batch=(1, 4),
                          frames=(1, 8))
    assert half.bytes < 0.6 * full.bytes
    python_fp16 = _encoder().half()
    python_fp16.load_state_dict(enc.state_dict())
    sess = _session(half.path)
    x = _video(2, 5, dtype=torch.uint8)
    truth = _truth(enc, x)
    with torch.no_grad():
        own = ((python_fp16(x).double() - truth).norm() / truth.norm()).item()
    (y,) = sess.run(None, {"video": x.numpy()})
    assert y.dtype.name == "float32"
    assert_rel("fp16 onnx", torch.from_numpy(y), truth, max(2 * own, 1e-3))


def test_export_refuses_what_it_cannot_write(tmp_path):
    enc = _encoder()
    cases = [
        (dict(path=str(tmp_path / "a.txt")), "cannot tell the format"),
        (dict(path=str(tmp_path / "a.onnx"), dtype=torch.bfloat16), "no bf16 kernels"),
        (dict(path=str(tmp_path / "a.pt2"), dtype=torch.float64), "float32, float16 or bfloat16"),
        (dict(path=str(tmp_path / "a.pt2"), frames=(0, 8)), "frames must be"),
        (dict(path=str(tmp_path / "a.pt2"), batch=(4, 2)), "batch must be"),
        (dict(path=str(tmp_path / "a.pt2"), input="rgb"), "input must be"),
        (dict(path=str(tmp_path / "a.onnx"), device="meta"), "ONNX exports"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            export_encoder(enc, **kwargs)
    enc.backend = "reference"
    with pytest.raises(ValueError, match="reference"):
        export_encoder(enc, str(tmp_path / "a.pt2"))
    with pytest.raises(ValueError, match="XCLIPVideoEncoder"):
        export_encoder(torch.nn.Linear(2, 2), str(tmp_path / "a.pt2"))
    assert main(["export", "--out", str(tmp_path / "a.txt")]) == 2
    assert main(["export", "--out", str(tmp_path / "missing" / "a.pt2")]) == 2
    with pytest.raises(SystemExit):
        main(["export", "--out", str(tmp_path / "a.pt2"), "--frames", "8:2"])
    assert not [f for f in os.listdir(tmp_path)]  # nothing written


def test_an_unwritable_out_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """``--out`` in a folder where no file can be created: ``error:`` and exit 2 before the weights
    are loaded (an export took its whole time, then ended in a traceback). Creating a file is what
    is checked (permission bits do not stop root, nor tell a read-only file system): here that
    creation fails as a read-only folder makes it fail, and, where this process is not root, the
    folder is made read-only too. A failure while writing at the end is an ``error:`` (exit 1)."""
    import tempfile

    import xclip_fast.cli as cli

    folder = tmp_path / "ro"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, folder):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(cli, "_load_or_say", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert main(["export", "--out", str(folder / "enc.pt2"), "--preset", "b32"]) == 2
    assert f"the folder {folder} is not writable (Permission denied)" in capsys.readouterr().err
    monkeypatch.setattr(tempfile, "mkstemp", real)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            assert main(["export", "--out", str(folder / "enc.pt2"), "--preset", "b32"]) == 2
            assert "is not writable" in capsys.readouterr().err
        finally:
            folder.chmod(0o755)
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_load_or_say", lambda *a, **k: _encoder())
    monkeypatch.setattr("xclip_fast.export.export_encoder", full)
    assert main(["export", "--out", str(folder / "enc.pt2"), "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "error: writing --out" in err and "No space left on device" in err
    assert os.listdir(folder) == []


def test_inference_dtype_is_bf16_on_cpus_with_native_bf16(monkeypatch, capsys):
    import xclip_fast.dtypes as dtypes

    cpu = torch.device("cpu")
    monkeypatch.setattr(dtypes, "cpu_native_bf16", lambda: "AVX512-BF16")
    assert chosen_dtype(None, cpu) == torch.bfloat16
    assert "native bf16 (AVX512-BF16)" in capsys.readouterr().out  # announced
    assert chosen_dtype("float32", cpu) == torch.float32  # one option away
    monkeypatch.setattr(dtypes, "cpu_native_bf16", lambda: None)
    assert chosen_dtype(None, cpu) == torch.float32
    assert dtypes.inference_dtype("cuda")[0] == torch.float16


def test_a_failed_export_leaves_the_previous_artifact(tmp_path, monkeypatch):
    """AOTInductor failing half-way (a compiler error, a full disk) leaves the artifact already at
    that name as it was, and no temporary file."""
    enc = _encoder()
    path = tmp_path / "encoder.pt2"
    path.write_bytes(b"the artifact of yesterday")

    def fails(program, package_path, **kwargs):
        with open(package_path, "wb") as f:
            f.write(b"half a package")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fails)
    with pytest.raises(OSError, match="No space left"):
        export_encoder(enc, str(path), frames=(1, 4), batch=(1, 2))
    assert path.read_bytes() == b"the artifact of yesterday"
    assert os.listdir(tmp_path) == ["encoder.pt2"]


def test_names_and_files_that_are_not_artifacts_are_refused_with_their_name(tmp_path, capsys):
    enc = _encoder()
    with pytest.raises(ValueError, match=r"m\.pt2: the name says \.pt2 but the format is onnx"):
        export_encoder(enc, str(tmp_path / "m.pt2"), format="onnx")
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "the name says .pt2" in capsys.readouterr().err
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "corrupt.pt2").write_bytes(b"not a zip archive at all")
    for name, error, match in (("empty.onnx", ValueError, "not an xclip-fast artifact"),
                               ("corrupt.pt2", ValueError, "not a readable .pt2 file"),
                               ("missing.pt2", FileNotFoundError, "no such file")):
        with pytest.raises(error, match=match) as caught:
            read_metadata(str(tmp_path / name))
        assert name in str(caught.value)


def test_lora_on_multihead_attention_is_refused_before_export(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is in the test extra")
    model = peft.get_peft_model(_encoder(), peft.LoraConfig(r=2, target_modules=["attn"]))
    inner = model.base_model.model
    with pytest.raises(ValueError, match=r"visual\.transformer\.resblocks\.0\.attn is a PEFT LoRA adapter.*"
                                         r"merge_and_unload"):
        export_encoder(inner, str(tmp_path / "a.pt2"))
    assert not os.listdir(tmp_path)
