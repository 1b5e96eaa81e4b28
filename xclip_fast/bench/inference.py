"""The inference level of ``xclip-fast bench``: what one would serve the video encoder with, side by side.

Providers, on the same weights and inputs (``video (b, T, 3, H, W) -> (b, E)``):

- ``reference``: the original modules, eager; ``reference-compiled``: the same under ``torch.compile``;
- ``xclip-fast``: the fast encoder, eager (backend ``auto``); ``xclip-fast-compiled``: under ``torch.compile``;
- ``pt2``: the ``.pt2`` package of :func:`xclip_fast.export.export_encoder` (AOTInductor), loaded with
  ``torch._inductor.aoti_load_package``, one package per model and dtype for every batch and T;
- ``onnxruntime``: the ONNX model in ONNX Runtime (CUDA execution provider when present, else CPU;
  float32 or float16 weights: ONNX Runtime's CPU provider has no bf16 kernels).

Columns: latency p50 and p90 (ms), videos per second (batch / p50), memory: on CPU the peak resident
growth of one call in a fresh process (the weights and the loaded artifact do not count), on CUDA the
allocator's peak above what is allocated before the call (ONNX Runtime's own allocator is not seen:
no figure). Every provider is checked against the original in float32 (the truth): the allowed error
is the float32 tolerance in float32, and in lower precision twice the original's own error in it.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch

from xclip_fast.bench.cases import Case
from xclip_fast.bench.measure import MIB, cuda_memory, deciles, free, fresh_rss_mib, interleaved_times, rss_growth
from xclip_fast.bench.results import Result, compare_to_reference
from xclip_fast.bench.workloads import Skip, original_encoder, original_forward
from xclip_fast.dtypes import dtype_name
from xclip_fast.encoder import XCLIPVideoEncoder
from xclip_fast.testing import TOLERANCES, rel_err

__all__ = ["INFERENCE_PROVIDERS", "inference_rows", "inference_table"]

INFERENCE_PROVIDERS = ["reference", "reference-compiled", "xclip-fast", "xclip-fast-compiled", "pt2", "onnxruntime"]
# the modules take the video in the weights' dtype; the artifacts take float32 frames
_MODULES = ("reference", "reference-compiled", "xclip-fast", "xclip-fast-compiled")
_ARTIFACT = {"pt2": "pt2", "onnxruntime": "onnx"}  # provider -> the artifact format it runs


def _original_forward(enc: XCLIPVideoEncoder, T: int, device, dtype):
    """``video (b, T, 3, H, W) -> (b, E)`` through the original modules built for T frames
    (:func:`xclip_fast.bench.workloads.original_encoder`)."""
    return original_forward(*(m.to(device, dtype).eval().requires_grad_(False) for m in original_encoder(enc, T)))


class _Providers:
    """The providers of one model and dtype; artifacts are written once into ``workdir`` and serve
    every case of the model (their batch and T are dynamic)."""

    def __init__(self, model: str, overrides: dict, dtype, device, workdir: str, max_batch: int, max_frames: int):
        self.model, self.overrides, self.dtype, self.device = model, overrides, dtype, device
        self.workdir, self.max_batch, self.max_frames = workdir, max_batch, max_frames
        torch.manual_seed(0)
        self.enc = XCLIPVideoEncoder.from_config(model, **overrides).eval()  # float32 CPU: the source of weights
        self.artifacts = {}

    def artifact(self, fmt: str) -> str:
        from xclip_fast.export import export_encoder

        if fmt not in self.artifacts:
            path = os.path.join(self.workdir, f"{self.model}-{dtype_name(self.dtype)}.{fmt}")
            # the export's default ranges (batch 1..64, T 1..256), as a user would export it
            export_encoder(self.enc, path, dtype=self.dtype, batch=(1, max(64, self.max_batch)),
                           frames=(1, max(256, self.max_frames)), device=self.device if fmt == "pt2" else "cpu")
            self.artifacts[fmt] = path
        return self.artifacts[fmt]

    def build(self, name: str, T: int):
        """A callable ``video -> (b, E)`` for provider ``name`` (compiling or loading as needed)."""
        dev, dt = self.device, self.dtype
        if name in ("reference", "reference-compiled"):
            original = _original_forward(self.enc, T, dev, dt)
            return torch.compile(original) if name == "reference-compiled" else original
        if name in ("xclip-fast", "xclip-fast-compiled"):
            enc = XCLIPVideoEncoder.from_config(self.model, **self.overrides)
            enc.load_state_dict(self.enc.state_dict())
            enc = enc.to(dev, dt).eval().requires_grad_(False)
            return torch.compile(enc) if name == "xclip-fast-compiled" else enc
        if name == "pt2":
            return torch._inductor.aoti_load_package(self.artifact("pt2"))
        if name == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError:
                raise Skip("onnxruntime is not installed (pip install 'xclip-fast[export]')") from None
            if dt == torch.bfloat16:
                raise Skip("ONNX Runtime's CPU provider has no bf16 kernels")
            providers = ["CUDAExecutionProvider"] if dev.type == "cuda" else []
            providers = [p for p in providers if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
            session = ort.InferenceSession(self.artifact("onnx"), providers=providers)

            def run(video):
                (y,) = session.run(None, {"video": video.cpu().numpy()})
                return torch.from_numpy(y)
            return run
        raise ValueError(f"unknown inference provider {name!r}; choose from {INFERENCE_PROVIDERS}")


def _call(fn, video):
    """One call of a provider under inference mode, finished on the device when it returns."""
    with torch.inference_mode():
        out = fn(video)
    if video.device.type == "cuda":
        torch.cuda.synchronize(video.device)
    return out


def _probe(model, overrides, dtype, name, T, batch, workdir, artifacts):
    """Runs in a fresh process (:func:`~xclip_fast.bench.measure.fresh_rss_mib`): the resident growth
    (bytes) of one call after a warm-up call; the weights and the loaded artifact do not count."""
    p = _Providers(model, overrides, dtype, torch.device("cpu"), workdir, 1, 1)
    p.artifacts = artifacts
    fn = p.build(name, T)
    r = p.enc.config["input_resolution"]
    video = torch.randn(batch, T, 3, r, r, dtype=dtype if name in _MODULES else torch.float32)
    del p.enc
    return rss_growth(lambda: _call(fn, video))


def inference_rows(models, frames, batches, dtype: torch.dtype, device: torch.device, quick: bool, env: dict,
                   workdir: str, providers=None, overrides: dict | None = None, memory: bool = True) -> list[Result]:
    """Rows of the inference level: every provider on every (model, T, batch).

    ``overrides``: constructor arguments for every model (tests use tiny ones); ``memory=False``
    leaves out the fresh-process memory probes.
    """
    names = [p for p in INFERENCE_PROVIDERS if providers is None or p in providers]
    overrides = dict(overrides or {})
    label = dtype_name(dtype)
    rows = []
    os.makedirs(workdir, exist_ok=True)
    for model in models:
        prov = _Providers(model, overrides, dtype, device, workdir, max(batches), max(frames))
        cfg = prov.enc.config
        r = cfg["input_resolution"]
        tokens = (r // cfg["patch_size"]) ** 2 + 1
        for T in frames:
            for batch in batches:
                case = Case("inference", "encoder", model, batch, T, tokens, cfg["width"], cfg["heads"])
                video = torch.randn(batch, T, 3, r, r, generator=torch.Generator().manual_seed(T * 1000 + batch))
                video = video.to(device)  # the artifacts' input: float32 frames
                # the truth: the original in float32 on the same device
                truth = _call(_original_forward(prov.enc, T, device, torch.float32), video).float().cpu()
                inputs = {n: video.to(dtype) if n in _MODULES else video for n in names}  # modules: their dtype
                timed, by_name, ref_err = {}, {}, None
                for name in names:
                    row = Result.make(env, case, label, "fwd", name, checked_against="reference float32")
                    rows.append(row)
                    by_name[name] = row
                    try:
                        fn = prov.build(name, T)
                        t0 = time.perf_counter()
                        out = _call(fn, inputs[name])
                        row.extras["first_call_s"] = time.perf_counter() - t0  # compiles on the first call
                        err = rel_err(out.float().cpu(), truth)
                        if name == "reference":
                            ref_err = err
                        # float32: rounding only; lower precision: the original's own error in it sets the bar
                        tol = TOLERANCES[torch.float32]
                        if not row.check({"output": err}, tol if dtype == torch.float32 or ref_err is None
                                         else max(2 * ref_err, tol)):
                            continue
                        timed[name] = functools.partial(_call, fn, inputs[name])
                    except Exception as exc:
                        row.fail(exc)
                    finally:
                        free(device)
                # alternating rounds, so that drifts of a shared machine hit every provider alike
                times = interleaved_times(timed, rounds=3 if quick else 7, budget=0.3 if quick else 1.0)
                for name, ts in times.items():
                    row = by_name[name]
                    q = deciles(ts)
                    row.median_ms, row.p20_ms, row.p80_ms = statistics.median(ts), q[1], q[7]
                    row.extras.update(p50_ms=row.median_ms, p90_ms=q[8], calls=len(ts),
                                      videos_per_s=batch / (row.median_ms * 1e-3))
                    if memory:
                        try:
                            if device.type == "cpu":
                                row.extra_mib = fresh_rss_mib(_probe, model, overrides, dtype, name, T, batch,
                                                              workdir, prov.artifacts)
                            elif name != "onnxruntime":  # ONNX Runtime's allocator is not PyTorch's
                                row.peak_mib, row.extra_mib = cuda_memory(timed[name], device)
                        except Exception as exc:
                            row.extras["memory_error"] = f"{type(exc).__name__}: {exc}"[:200]
                compare_to_reference(by_name.values())
                del timed, inputs
                free(device)
        for r in rows:
            path = prov.artifacts.get(_ARTIFACT.get(r.provider)) if r.model == model else None
            if path:
                r.extras["artifact_mib"] = os.path.getsize(path) / MIB
        del prov
        free(device)
    return rows


def inference_table(rows: list[Result], env: dict) -> str:
    """The inference rows as a Markdown table, one line per provider and case."""
    from xclip_fast.bench.results import markdown_table

    recs = []
    for r in rows:
        x = r.extras
        recs.append({"model": r.model, "T": r.frames, "batch": r.batch, "dtype": r.dtype, "provider": r.provider,
                     "p50 ms": r.median_ms, "p90 ms": x.get("p90_ms"), "videos/s": x.get("videos_per_s"),
                     "x original": r.speedup, "peak MiB": r.extra_mib if r.extra_mib is not None else None,
                     "error": None if r.error is None else f"{r.error:.1e}",
                     "status": r.status if r.status == "ok" else f"{r.status}: {r.reason}"})
    head = (f"inference - {env['device']} - torch {env['torch']} - commit {env['commit']} - {env['timestamp']}\n"
            "p50/p90: latency of one call (ms); videos/s: batch / p50; x original: the original eager's p50 over "
            "this one's; peak MiB: resident growth of one call in a fresh process (CPU) / allocator peak above "
            "the call's start (CUDA); error: relative, against the original in float32\n")
    return head + markdown_table(recs, list(recs[0]) if recs else [])

