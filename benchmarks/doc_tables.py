"""Every table of measured numbers in README.md and docs/, written from the committed results it cites.

    python benchmarks/doc_tables.py           # rewrite the tables in place
    python benchmarks/doc_tables.py --check   # print where a page differs from what this would write; exit 1

A generated table sits in a page between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is a key of
``TABLES``. What this writes there is a source line (the results folder, linked; device, date, the commit
that measured it or the commit that added the folder; measured, or extrapolated from CPU) and the table,
each figure read from that folder's files. ``tests/test_docs.py`` fails when a page differs from what this
would write, and when a table with decimal figures sits outside such a block. To add a table: write a
function here that reads the results, add it to ``TABLES``, put the two markers in the page, run this.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

BEGIN = re.compile(r"^<!-- table: ([\w./-]+) -->$")
END = "<!-- /table -->"


@dataclass(frozen=True)
class Source:
    """Where a table's figures come from. ``commit`` is the commit the run recorded; runs whose files do
    not record one cite the commit that added their folder (``added=True``, checked against git by the
    tests)."""

    folder: str
    device: str
    date: str
    commit: str
    added: bool = False
    extrapolated: bool = False

    def link(self, page: str) -> str:
        """The results folder, relative to ``page``."""
        return os.path.relpath(RESULTS / self.folder, (ROOT / page).parent).replace(os.sep, "/") + "/"

    @property
    def commits(self) -> str:
        """The commit(s), each in backquotes."""
        return ", ".join(f"`{c}`" for c in self.commit.split(", "))

    def line(self, page: str, what: str = "") -> str:
        commit = (f"results added in {self.commits}" if self.added
                  else f"commit{'s' if ',' in self.commit else ''} {self.commits}")
        kind = "**extrapolated from CPU measurements** (no GPU measured it)" if self.extrapolated else "measured"
        return (f"<sub>{kind}{what}: {self.device}, {self.date}, {commit};"
                f" [`benchmarks/results/{self.folder}`]({self.link(page)})</sub>")

    @property
    def short_device(self) -> str:
        return re.split(r" \(|,", self.device)[0]

    def with_commits(self, *others: Source) -> Source:
        return replace(self, commit=", ".join(sorted({c for s in (self, *others) for c in s.commit.split(", ")})))

    def extrapolation(self) -> Source:
        return replace(self, extrapolated=True)


CPU2 = "CPU x86_64, 2 cores"
TRAINING = Source("cpu-training-memory-2026-12-03", f"{CPU2}, torch 2.13.0", "2026-12-03", "edcf8b3", added=True)
OFFLOAD = Source("cpu-offload-2026-12-03", f"{CPU2}, torch 2.13.0", "2026-12-03", "818e4eb", added=True)
FRAMES = Source("cpu-frame-parallel-2026-12-03", f"{CPU2}, torch 2.13.0, gloo", "2026-12-03", "edcf8b3",
                added=True)
HF_FRAMES = Source("cpu-hf-frame-parallel-2026-12-04", f"{CPU2}, torch 2.13.0, gloo", "2026-12-04", "007d0d2",
                   added=True)
LORA = Source("cpu-lora-mlp-2026-12-04", f"{CPU2}, torch 2.13.0", "2026-12-04", "007d0d2", added=True)
LAUNCH = Source("cpu-launch-host-2026-12-06", f"{CPU2}, torch 2.15.0, triton 3.9.0", "2026-12-06", "b2d1e6a",
                added=True)
ADDED_IN = {s.folder: s.commit for s in (TRAINING, OFFLOAD, FRAMES, HF_FRAMES, LORA, LAUNCH)}


# -- reading -------------------------------------------------------------------------------------------

def _json(folder: str, name: str = "results.json"):
    return json.loads((RESULTS / folder / name).read_text(encoding="utf-8"))


def _bench_run(folder: str, name: str) -> tuple[Source, list[dict]]:
    """A ``xclip-fast bench`` run file: its rows and the source its environment names."""
    run = _json(folder, name)
    env = run["environment"]
    device = f"{env['device']}, torch {env['torch']}, triton {env['triton']}"
    return Source(folder, device, env["timestamp"][:10], env["commit"]), run["rows"]


def _h200_block() -> tuple[Source, list[dict], list[dict]]:
    """The H200 run's two bench invocations of the B/16 block (eager forward and forward + backward; then
    forward + backward again with the compiled providers)."""
    src, first = _bench_run("h200-2026-12-04", "bench/run-20261204T115500+0000.json")
    src2, second = _bench_run("h200-2026-12-04", "bench/run-20261204T115733+0000.json")
    return src.with_commits(src2), first, second


def _row(rows, **match) -> dict:
    found = [r for r in rows if all(str(r[k]) == str(v) for k, v in match.items())]
    if len(found) != 1:
        raise LookupError(f"{len(found)} rows match {match}")
    return found[0]


# -- writing -------------------------------------------------------------------------------------------

def _f(x, digits: int = 3) -> str:
    if x is None or x == "":
        return "-"
    return f"{float(x):.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _records(records: list[dict], columns: list[tuple[str, int | None]]) -> list[str]:
    """A table of result records, headed by their keys: (key, decimals or None for as is)."""
    return _table([k for k, _ in columns],
                  [[(r.get(k) if d is None else _f(r.get(k), d)) for k, d in columns] for r in records])


def _levels(levels: str) -> str:
    """'min min lean none' -> 'min x2, lean, none' (runs of one level, in order)."""
    out, words = [], levels.split()
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and words[j] == words[i]:
            j += 1
        out.append(words[i] if j - i == 1 else f"{words[i]} x{j - i}")
        i = j
    return ", ".join(out)


# -- the tables ----------------------------------------------------------------------------------------

def headline(page: str) -> list[str]:
    """README: one row per headline claim, GPU first; every row says where, when and at which commit."""
    gpu, first, second = _h200_block()
    fwd, fwd_ref = (_row(first, mode="fwd", provider=p) for p in ("xclip-fast-triton", "reference"))
    step, step_ref = (_row(first, mode="fwdbwd", provider=p) for p in ("xclip-fast-triton", "reference"))
    comp, comp_ref = (_row(second, provider=p) for p in ("xclip-fast-triton-compiled", "reference-compiled"))

    cpu_src, cpu = _bench_run("cpu-2026-11-26", "run-20261126T142648+0000.json")
    enc = [r for r in cpu if r["case"] == "encoder b32 b=1 T=32"]
    enc_ref, chunked = _row(enc, provider="reference"), _row(enc, provider="xclip-fast-torch-chunked")
    inf_src, inf = _bench_run("cpu-inference-2026-11-30", "run-float32-b8.json")
    pt2, inf_ref = _row(inf, provider="pt2"), _row(inf, provider="reference-compiled")
    blocks = _json(TRAINING.folder)["blocks"]["B/16"]
    lean, orig = _row(blocks, variant="fast, recompute=lean"), _row(blocks, variant="original")
    longest = _json(TRAINING.folder)["longest_clip"]["b16"]
    lmin, lref = _row(longest, variant="xclip-fast-min"), _row(longest, variant="reference")

    def where(src: Source, kind: str = "measured") -> list[str]:
        return [src.short_device, src.date, src.commits + (" (added)" if src.added else ""),
                f"[{kind}]({src.link(page)})"]

    rows = [
        ["B/16 block, training step (bf16, batch 8, T = 8): triton backend vs the eager original",
         f"**{step_ref['median_ms'] / step['median_ms']:.2f}x** "
         f"({_f(step['median_ms'], 2)} vs {_f(step_ref['median_ms'], 2)} ms)", *where(gpu)],
        ["the same, both under `torch.compile`",
         f"**{comp_ref['median_ms'] / comp['median_ms']:.2f}x** "
         f"({_f(comp['median_ms'], 2)} vs {_f(comp_ref['median_ms'], 2)} ms)", *where(gpu)],
        ["the same block, forward: time / peak memory against the original",
         f"{fwd_ref['median_ms'] / fwd['median_ms']:.2f}x / {fwd['memory_ratio']:.2f}x",
         *where(gpu)],
        ["B/16 block, held for the backward at `recompute=\"lean\"` against the original",
         f"{lean['held_mib'] / orig['held_mib']:.2f}x, matmul FLOPs {lean['flops_x']:.3f}x", *where(TRAINING)],
        ["B/16 encoder, longest trainable clip on 80 GB (batch 1, bf16), `\"min\"` vs the original",
         f"{lmin['T_max_80GB']} vs {lref['T_max_80GB']} frames", *where(TRAINING, "extrapolated from CPU")],
        ["B/32 encoder inference, T = 32, `chunk_frames=8` (float32): time / memory vs the original",
         f"{enc_ref['median_ms'] / chunked['median_ms']:.2f}x / {chunked['extra_mib'] / enc_ref['extra_mib']:.2f}x",
         *where(cpu_src)],
        ["B/32 encoder served as a `.pt2` package, T = 8, batch 8 (float32): vs the compiled original",
         f"{inf_ref['median_ms'] / pt2['median_ms']:.2f}x", *where(inf_src)],
    ]
    return [*_table(["what", "result", "device", "date", "commit", "source"], rows), "",
            "<sub>commit: the one the run recorded; (added): the run's files record none, so the commit that added "
            "them.</sub>"]


def long_clip_peak(page: str) -> list[str]:
    src, rows = _bench_run("cpu-2026-11-26", "encoder-run-20261126T144334+0000.json")
    out = []
    for t in (8, 32, 64, 128):
        case = [r for r in rows if r["case"] == f"encoder b32 b=1 T={t}"]
        out.append([t] + [f"{_row(case, provider=p)['extra_mib']:.1f} MiB"
                          for p in ("reference", "xclip-fast-torch", "xclip-fast-torch-chunked")])
    return [src.line(page, ", float32, MiB above the weights and the input"), "",
            *_table(["T", "original", "fast, unchunked", "fast, `chunk_frames=8`"], out)]


def _inference(page: str, dtype: str) -> list[str]:
    names = {"reference": "original, eager", "reference-compiled": "original, `torch.compile`",
             "xclip-fast": "xclip-fast, eager", "xclip-fast-compiled": "xclip-fast, `torch.compile`",
             "pt2": "`.pt2` package", "onnxruntime": "ONNX Runtime (CPU)"}
    src, b1 = _bench_run("cpu-inference-2026-11-30", f"run-{dtype}-b1.json")
    src8, b8 = _bench_run("cpu-inference-2026-11-30", f"run-{dtype}-b8.json")
    src = src.with_commits(src8)
    last = "videos/s at b=8" if dtype == "float32" else "error (T=8 b=1)"
    out = []
    for p, name in names.items():
        cells = []
        for rows, case in ((b1, "encoder b32 b=1 T=8"), (b1, "encoder b32 b=1 T=32"), (b8, "encoder b32 b=8 T=8")):
            r = _row(rows, case=case, provider=p)
            cells += ["-", "-"] if r["status"] != "ok" else [_f(r["median_ms"], 1), _f(r["extra_mib"], 1)]
        if cells == ["-"] * 6:
            continue
        if dtype == "float32":
            r = _row(b8, case="encoder b32 b=8 T=8", provider=p)
            cells.append(_f(r["extras"]["videos_per_s"], 2))
        else:
            cells.append(f"{_row(b1, case='encoder b32 b=1 T=8', provider=p)['error']:.1e}")
        artifact = _row(b1, case="encoder b32 b=1 T=8", provider=p).get("artifact_mib")
        out.append([name, *cells, _f(artifact, 0)])
    header = [f"B/32, {dtype}", "T=8 b=1 ms", "MiB", "T=32 b=1 ms", "MiB", "T=8 b=8 ms", "MiB", last,
              "artifact MiB"]
    return [src.line(page, f", p50 latency and resident growth of one call, {dtype}"), "", *_table(header, out)]


def _training(key: str, model: str, columns, what: str, extrapolated: bool = False):
    def render(page: str) -> list[str]:
        data = _json(TRAINING.folder)[key]
        records = data[model] if model else data
        src = TRAINING.extrapolation() if extrapolated else TRAINING
        return [src.line(page, what), "", *_records(records, columns)]
    return render


HELD = [("variant", None), ("held_mib", 3), ("held_x", 3), ("flops_x", 3), ("time_ms", 3), ("time_x_none", 3)]
LONGEST = [("variant", None), ("held_mib_per_frame", 3), ("mib_per_frame", 3), ("T_max_80GB", None),
           ("T_max_141GB", None), ("x_original", 3), ("x_selective", 3)]


def budgets(page: str) -> list[str]:
    curve = _json(TRAINING.folder)["budgets"]["b32"]["curve"]
    rows = [[r["variant"], _f(r["held_x"]), _f(r["flops_x"]), _levels(r["levels"]) if "levels" in r else "-"]
            for r in curve]
    return [TRAINING.line(page, ", float32"), "", *_table(["variant", "held_x", "flops_x", "levels"], rows)]


def budget_targets(page: str) -> list[str]:
    targets = _json(TRAINING.folder)["budgets"]["b32"]["targets"]
    rows = [[f"{t['target']:.2f}x", _f(t["budget"]), _f(t["held_x"]), _f(t["flops_x"]), _f(t["compiled_flops_x"]),
             _levels(t["levels"])] for t in targets]
    header = ["original's held fraction", "`recompute=`", "held_x", "flops_x", "compiled original's flops_x",
              "levels"]
    return [TRAINING.line(page, ", float32"), "", *_table(header, rows)]


def launch_host(page: str) -> list[str]:
    data = _json(LAUNCH.folder)["checkouts"]
    (before, b), (after, a) = list(data.items())
    rows = []
    for key in b["median_ms"]:
        level, step = key.split()
        x, y = b["median_ms"][key], a["median_ms"][key]
        rows.append([level, {"train": "training step", "infer": "inference forward"}[step], _f(x), _f(y),
                     _f(y / x, 2)])
    return [LAUNCH.line(page, ", one thread, host ms per call, launches replaced by no-ops"), "",
            *_table(["level", "call", f"`{before}`", f"`{after}`", "after / before"], rows)]


def offload(model: str):
    def render(page: str) -> list[str]:
        names = {"original": "original", "fast, recompute=none": '`"none"`', "fast, recompute=lean": '`"lean"`',
                 "fast, recompute=min": '`"min"`', "fast, recompute=block": '`"block"`'}
        recs = {r["variant"]: r for r in _json(OFFLOAD.folder)["offload"][model]}
        sizes = {"B/16": "l=197", "B/32": "l=50"}[model]
        rows = [[name, *(_f(recs[v][k]) for k in ("held_mib", "hooked_mib", "outside_mib", "moved_mib",
                                                       "moved_parameters_mib"))] for v, name in names.items()]
        header = [f"{model} block ({sizes}, T=8, batch 1)", "held", "hooks see", "outside", "`save_on_cpu` copies",
                  "of it parameters"]
        return [OFFLOAD.line(page, ", bf16 autocast, MiB"), "", *_table(header, rows)]
    return render


def frames_held(page: str) -> list[str]:
    rows = [[{"b32": "B/32", "b16": "B/16"}[r["model"]], r["W"], f"{r['held_mib']:.2f} MiB",
             f"{r['one_process_over_W_mib']:.2f} MiB", _f(r["ratio"])] for r in _json(FRAMES.folder)["held"]]
    return [FRAMES.line(page, ", float32, `recompute=\"lean\"`, T = 8, batch 1"), "",
            *_table(["model", "W", "held per process", "one process / W", "ratio"], rows)]


def frames_comm(page: str) -> list[str]:
    rows = [[{"b32": "B/32", "b16": "B/16"}[r["model"]], r["W"], r["T"], r["b"], r["all_gathers"],
             f"{r['all_gather_bytes']:,}", r["reduce_scatters"], f"{r['reduce_scatter_bytes']:,}"]
            for r in _json(FRAMES.folder)["comm"]]
    return [FRAMES.line(page, ", bf16, forward + backward, process 0"), "",
            *_table(["model", "W", "T", "batch", "all-gathers", "bytes", "reduce-scatters", "bytes"], rows)]


def frames_longest(page: str) -> list[str]:
    rows = [[{"b16": "B/16", "l14": "L/14"}[r["model"]], r["variant"].removeprefix("xclip-fast-"),
             _f(r["held_mib_per_frame"], 2), _f(r["every_process_mib_per_frame"]), r["T_max_80GB_W1"],
             r["T_max_80GB_W2"], r["T_max_80GB_W8"]] for r in _json(FRAMES.folder)["longest"]]
    header = ["model", "`recompute`", "MiB per frame, one process", "MiB per clip frame on every process",
              "W = 1", "W = 2", "W = 8"]
    return [FRAMES.extrapolation().line(page, ", longest clip per 80 GB GPU, batch 1, bf16 autocast"), "",
            *_table(header, rows)]


def hf_held(page: str) -> list[str]:
    rows = [[{"b32": "B/32", "b16": "B/16"}[r["model"]], r["W"], _f(r["held_mib"], 1), _f(r["text_tower_mib"], 1),
             _f(r["rest_mib"], 1), _f(r["one_process_rest_over_W_mib"], 1), _f(r["ratio"])]
            for r in _json(HF_FRAMES.folder)["held"]]
    header = ["model", "W", "held MiB", "text tower", "the rest", "one process's rest / W", "ratio"]
    return [HF_FRAMES.line(page, ", float32, `lean`, T = 8, one video and 8 captions of 77 tokens"), "",
            *_table(header, rows)]


def hf_longest(page: str) -> list[str]:
    recs = _json(HF_FRAMES.folder)["longest"]
    rows = []
    for model in ("b32", "b16"):
        original = _row(recs, model=model, variant="original")["T_max_80GB_W1"]
        for i, r in enumerate(x for x in recs if x["model"] == model and x["variant"] != "original"):
            rows.append([{"b32": "B/32", "b16": "B/16"}[model], r["variant"].removeprefix("xclip-fast-"),
                         _f(r["held_mib_per_frame"], 2), r["T_max_80GB_W1"], r["T_max_80GB_W2"], r["T_max_80GB_W8"],
                         original if i == 0 else ""])
    header = ["model", "`recompute`", "MiB per frame", "W = 1", "W = 2", "W = 8", "original (W = 1)"]
    return [HF_FRAMES.extrapolation().line(page, ", whole XCLIPModel, longest clip per 80 GB GPU, batch 1, bf16"),
            "", *_table(header, rows)]


def lora(page: str) -> list[str]:
    cols = [("variant", None), ("held_mib", 3), ("held_x_frozen", 3), ("flops_x_frozen", 3), ("time_ms", 1),
            ("time_x_frozen", 3)]
    return [LORA.line(page, ", one block at B/32 sizes, T = 8, float32, `lean`, r = 16, 2 threads"), "",
            *_records(_json(LORA.folder)["lora"], cols)]


def h200_block(page: str) -> list[str]:
    src, first, second = _h200_block()
    block = [r for r in first if r["case"] == "block b16 b=8 T=8"]
    runs = [("forward, eager", [r for r in block if r["mode"] == "fwd"], "reference", False),
            ("forward + backward", [r for r in block if r["mode"] == "fwdbwd"], "reference", False),
            ("forward + backward, second run", second, "reference", False),
            ("forward + backward, second run", second, "reference-compiled", True)]
    out = []
    for what, run, base, compiled in runs:
        ref = _row(run, provider=base)
        for r in run:
            if r["status"] == "ok" and r["provider"] != base and r["provider"].endswith("-compiled") == compiled:
                out.append([what, r["provider"], _f(r["median_ms"]), f"{base}: {_f(ref['median_ms'])}",
                            _f(ref["median_ms"] / r["median_ms"], 2), _f(r["memory_ratio"], 2)])
    header = ["B/16 block, batch 8, T = 8", "provider", "ms", "against", "speedup", "memory ratio"]
    return [src.line(page, ", bf16, GPU time per call by CUDA events (host time inside)"), "", *_table(header, out)]


def cpu_bench(page: str) -> list[str]:
    src, rows = _bench_run("cpu-2026-11-26", "run-20261126T142648+0000.json")
    picks = [("frame attention, B/16 l=197, N=32", "frame attn b16 l=197 N=32",
              [("fwd", "reference"), ("fwd", "sdpa-math"), ("fwd", "xclip-fast-torch"), ("fwdbwd", "reference"),
               ("fwdbwd", "xclip-fast-torch")]),
             ("block B/32, b=1, T=32", "block b32 b=1 T=32",
              [("fwdbwd", "reference"), ("fwdbwd", "reference-compiled"), ("fwdbwd", "xclip-fast-torch")]),
             ("encoder B/32, b=1, T=32 (inference)", "encoder b32 b=1 T=32",
              [("fwd", "reference"), ("fwd", "xclip-fast-torch"), ("fwd", "xclip-fast-torch-chunked")])]
    out = []
    for label, case, which in picks:
        for i, (mode, provider) in enumerate(which):
            r = _row(rows, case=case, mode=mode, provider=provider)
            out.append([label if i == 0 else "", {"fwd": "fwd", "fwdbwd": "fwd+bwd"}[mode], provider,
                        _f(r["median_ms"], 1), _f(r["speedup"], 2), _f(r["extra_mib"], 1), _f(r["memory_ratio"], 2)])
    return [src.line(page, ", float32, the torch backend (Triton runs only in its interpreter on a CPU)"), "",
            *_table(["case", "mode", "provider", "time ms", "speedup", "mem MiB", "mem ratio"], out)]


def cpu_compiled(page: str) -> list[str]:
    src, block = _bench_run("cpu-2026-11-27", "run-20261127T084243+0000.json")
    src32, enc32 = _bench_run("cpu-2026-11-27", "run-20261127T092026+0000.json")
    src8, enc8 = _bench_run("cpu-2026-11-27", "run-20261127T092723+0000.json")
    src = src.with_commits(src32, src8)
    picks = [(block, "block b32 b=1 T=8", "block, T=8"), (block, "block b32 b=1 T=32", "block, T=32"),
             (enc8, "encoder b32 b=1 T=8", "encoder, T=8"), (enc32, "encoder b32 b=1 T=32", "encoder, T=32")]
    out = []
    for rows, case, label in picks:
        for mode in ("fwd", "fwdbwd"):
            run = [r for r in rows if r["case"] == case and r["mode"] == mode]
            if not run:
                continue
            ref, fast = _row(run, provider="reference-compiled"), _row(run, provider="xclip-fast-torch-compiled")
            mem = (f"{fast['extra_mib'] / ref['extra_mib']:.2f} ({fast['extra_mib']:.1f} vs {ref['extra_mib']:.1f} MiB)"
                   if mode == "fwd" else "")
            out.append([label, {"fwd": "fwd", "fwdbwd": "fwd+bwd"}[mode], _f(ref["median_ms"], 1),
                        _f(fast["median_ms"], 1), _f(ref["median_ms"] / fast["median_ms"], 2), mem])
    header = ["case", "mode", "reference-compiled ms", "xclip-fast-torch-compiled ms", "speedup",
              "inference memory ratio"]
    return [src.line(page, ", float32, B/32, batch 1, each provider compiled for its case"), "",
            *_table(header, out)]


TABLES = {
    "headline": headline,
    "long-clips/peak": long_clip_peak,
    "deploy/float32": lambda page: _inference(page, "float32"),
    "deploy/bfloat16": lambda page: _inference(page, "bfloat16"),
    "training/host": _training("host", "", [("variant", None), ("host_ms", 3), ("host_x", 3), ("aten_ops", None)],
                               ", one thread, host ms of one block step"),
    "training/launch-host": launch_host,
    "training/block-b32": _training("blocks", "B/32", HELD, ", float32"),
    "training/block-b16": _training("blocks", "B/16", HELD, ", float32"),
    "training/encoder-b32": _training("encoders", "b32", HELD[:4], ", float32"),
    "training/budgets": budgets,
    "training/budget-targets": budget_targets,
    "training/longest-b16": _training("longest_clip", "b16", LONGEST, ", bf16 autocast", extrapolated=True),
    "training/longest-l14": _training("longest_clip", "l14", LONGEST, ", bf16 autocast", extrapolated=True),
    "training/offload-b16": offload("B/16"),
    "training/offload-b32": offload("B/32"),
    "frames/held": frames_held,
    "frames/comm": frames_comm,
    "frames/longest": frames_longest,
    "hf/held": hf_held,
    "hf/longest": hf_longest,
    "hf/lora": lora,
    "bench/h200-block": h200_block,
    "bench/cpu": cpu_bench,
    "bench/cpu-compiled": cpu_compiled,
}


def render(page: str, text: str) -> str:
    """The page with every generated table written anew."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = BEGIN.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        name = m.group(1)
        if name not in TABLES:
            raise KeyError(f"{page}: unknown table {name!r} (the names are in TABLES)")
        while i < len(lines) and lines[i] != END:
            if BEGIN.match(lines[i]):
                break
            i += 1
        if i == len(lines) or lines[i] != END:
            raise ValueError(f"{page}: table {name!r} has no {END}")
        out += TABLES[name](page)
        out.append(END)
        i += 1
    return "\n".join(out)


def _rewritten() -> dict[str, tuple[str, str]]:
    """Page -> (its text, what this script writes) for the pages that differ."""
    pages = {page: (ROOT / page).read_text(encoding="utf-8") for page in PAGES}
    return {page: (text, new) for page, text in pages.items() if (new := render(page, text)) != text}


def differences() -> dict[str, str]:
    """Page -> unified diff between it and what this script writes; empty when all agree."""
    return {page: "\n".join(difflib.unified_diff(text.split("\n"), new.split("\n"), page, page + " (results)",
                                                 lineterm="")) for page, (text, new) in _rewritten().items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a page differs")
    args = parser.parse_args(argv)
    if args.check:
        diffs = differences()
        for diff in diffs.values():
            print(diff)
        return 1 if diffs else 0
    for page, (_, new) in _rewritten().items():
        (ROOT / page).write_text(new, encoding="utf-8")
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
