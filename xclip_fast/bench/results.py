"""The result schema of a benchmark run, the environment it records, the table and the files."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields

import torch

from xclip_fast.bench.cases import Case

__all__ = ["Result", "Skip", "compare_to_reference", "CSV_FIELDS", "environment", "table", "write_outputs",
           "append_rows", "markdown_table", "section", "write_report"]


class Skip(Exception):
    """A provider that cannot run here; the message is the reason shown in the table."""


@dataclass
class Result:
    """One provider on one case in one mode: the row of the table, of results.csv (every field but
    ``extras``, in this order) and of the JSON files (with ``extras``)."""

    timestamp: str
    commit: str
    device: str
    torch: str
    triton: str
    xformers: str
    level: str
    case: str  # the case's label
    model: str
    dtype: str
    mode: str
    batch: int
    frames: int
    tokens: int
    provider: str
    status: str  # ok | skipped | mismatch | oom | error
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    speedup: float | None = None
    peak_mib: float | None = None
    extra_mib: float | None = None
    memory_ratio: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    bandwidth_fraction: float | None = None
    error: float | None = None
    tolerance: float | None = None
    checked_against: str = ""
    extras: dict = field(default_factory=dict, metadata={"csv": False})

    @classmethod
    def make(cls, env: dict, case: Case, dtype: str, mode: str, provider: str, status: str = "ok", **kw) -> Result:
        return cls(**env, level=case.level, case=case.label, model=case.model, dtype=dtype, mode=mode,
                   batch=case.batch, frames=case.frames, tokens=case.tokens, provider=provider, status=status, **kw)

    def fail(self, exc: BaseException) -> None:
        """Mark the row for an exception its provider raised: skipped (a :class:`Skip`, with its
        reason), out of memory, or an error (the exception's type and first line)."""
        if isinstance(exc, Skip):
            self.status, self.reason = "skipped", str(exc)
            return
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        self.status = "oom" if oom else "error"
        self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]

    def check(self, errors: dict, tolerance: float) -> bool:
        """Record the largest of ``errors`` (what -> relative error against the truth) and
        ``tolerance``; beyond it the row is a mismatch naming the worst. True when within."""
        worst = max(errors, key=errors.get)
        self.error, self.tolerance = errors[worst], tolerance
        if not self.error <= tolerance:
            self.status, self.reason = "mismatch", f"{worst}: error {self.error:.2e} > {tolerance:.1e}"
        return self.status == "ok"

    def record(self) -> dict:
        """Everything, ``extras`` merged in (the JSON form)."""
        rec = asdict(self)
        return {**rec, **rec.pop("extras")}


CSV_FIELDS = [f.name for f in fields(Result) if f.metadata.get("csv", True)]


def compare_to_reference(rows, reference: str = "reference") -> None:
    """``speedup`` and ``memory_ratio`` of every timed row of one case against the row of
    ``reference`` (when that one ran): its time over theirs, their memory over its."""
    ref = next((r for r in rows if r.provider == reference), None)
    if ref is None or ref.status != "ok" or not ref.median_ms:
        return
    for row in rows:
        if row.status == "ok" and row.median_ms and "/" not in row.provider:  # not a kernel row's part
            row.speedup = ref.median_ms / row.median_ms
            if row.extra_mib is not None and ref.extra_mib:
                row.memory_ratio = row.extra_mib / ref.extra_mib


def environment(device) -> dict:
    """Where a run happened: time, commit, device, library versions (the first fields of a Result)."""
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return "not installed"

    commit = os.environ.get("XCLIP_FAST_COMMIT", "")  # for copies outside a git checkout
    if not commit:
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
        except Exception:
            commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return dict(timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                device=name, torch=torch.__version__, triton=version("triton"), xformers=version("xformers"))


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows: list[Result], env: dict) -> str:
    lines = [f"xclip-fast bench - {env['device']} - torch {env['torch']}, triton {env['triton']}, "
             f"xformers {env['xformers']} - commit {env['commit']} - {env['timestamp']}",
             "time: median (p20-p80) ms; speedup and memory ratio against 'reference'; mem: MiB allocated above "
             "inputs and weights during the call (CUDA) / resident-memory growth in a fresh process (CPU)"]
    train = any(r.level == "train" for r in rows)
    # the attention level on CUDA: GPU time by graph replay, the host's time per call apart
    host = any(r.level == "attention" and "host_ms" in r.extras for r in rows)
    if host:
        lines.append("attention level: time is GPU time by CUDA-graph replay (no Python in it); host ms: what the "
                     "host spends issuing one call; '<provider>/<kernel>': one of our kernels launched alone")
    pw = max([26, *(len(r.provider) for r in rows)])  # the provider column
    header = f"{'case':38s} {'dtype':8s} {'mode':6s} {'provider':{pw}s} {'time ms':>22s} {'speedup':>8s} " \
             f"{'mem MiB':>9s} {'mem x':>6s} {'TFLOP/s':>8s} {'GB/s':>7s} {'%copy':>6s} {'error':>8s}"
    if host:
        header += f" {'host ms':>8s}"
    if train:
        header += f" {'flops x':>8s} {'host x':>7s} {'idle%':>6s} {'to host':>8s}"
        lines.append("train: one forward + backward + AdamW step of the encoder; mem: MiB held after the forward "
                     "for the backward (CPU; compiled providers: saved by their graph) / peak above the weights "
                     "and optimizer state (CUDA); TFLOP/s: the original's matmul FLOPs per second; flops x: "
                     "matmul FLOPs (attention included) against the original's; host x: host time of the same "
                     "step on a tiny encoder against the original's; idle%: of the step, the GPU ran no kernel; "
                     "to host: MiB one step moves to host memory under offloading (parameters included)")
    lines += [header, "-" * len(header)]
    last = None
    for r in rows:
        key = (r.case, r.dtype, r.mode)
        if last is not None and key != last:
            lines.append("")
        last = key
        if r.status != "ok":
            lines.append(f"{r.case:38s} {r.dtype:8s} {r.mode:6s} {r.provider:{pw}s} {r.status.upper()}: {r.reason}")
            continue
        t = f"{r.median_ms:.3f} ({r.p20_ms:.3f}-{r.p80_ms:.3f})"
        frac = _fmt(r.bandwidth_fraction and 100 * r.bandwidth_fraction, ".0f")
        line = (f"{r.case:38s} {r.dtype:8s} {r.mode:6s} {r.provider:{pw}s} {t:>22s} "
                f"{_fmt(r.speedup, '.2f'):>8s} {_fmt(r.extra_mib, '.1f'):>9s} {_fmt(r.memory_ratio, '.2f'):>6s} "
                f"{_fmt(r.tflops, '.2f'):>8s} {_fmt(r.gbps, '.0f'):>7s} {frac:>6s} {_fmt(r.error, '.1e'):>8s}")
        if host:
            line += f" {_fmt(r.extras.get('host_ms') if r.level == 'attention' else None, '.3f'):>8s}"
        if train:
            idle = r.extras.get("gpu_idle")
            line += (f" {_fmt(r.extras.get('flops_x'), '.3f'):>8s} {_fmt(r.extras.get('host_x'), '.2f'):>7s} "
                     f"{_fmt(idle and 100 * idle, '.0f'):>6s} {_fmt(r.extras.get('offloaded_mib'), '.1f'):>8s}")
        lines.append(line)
    return "\n".join(lines)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) over ``cols``: floats with 3 decimals, missing as ``-``."""
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def section(title: str, rows: list[dict], cols: list[str]) -> list[str]:
    """The Markdown lines of one table of a report: a ``###`` heading, the table, blank lines."""
    return [f"### {title}", "", markdown_table(rows, cols), ""]


def write_report(md: list[str], result: dict, folder: str | None) -> int:
    """Print the Markdown lines ``md`` of a benchmark script and, with ``folder``, write them to
    ``results.md`` and ``result`` to ``results.json`` there; returns 0 (the script's exit status)."""
    text = "\n".join(md)
    print(text)
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "results.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


def append_rows(rows: list[Result], out_dir: str) -> None:
    """Append ``rows`` to ``results.csv`` / ``results.jsonl`` (as each case ends: a run stopped
    part-way keeps what it measured)."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items() if k in CSV_FIELDS})
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r.record()) + "\n")


def write_outputs(rows: list[Result], env: dict, out_dir: str, copy_bw: float, appended: bool = False) -> dict:
    """Append to ``results.csv`` / ``results.jsonl`` (unless ``appended``: :func:`append_rows` did
    already), write ``run-<time>.json`` and the plot."""
    from xclip_fast.bench.plot import plot

    if not appended:
        append_rows(rows, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    records = [r.record() for r in rows]
    stamp = env["timestamp"].replace(":", "").replace("-", "")
    run_path = os.path.join(out_dir, f"run-{stamp}.json")
    with open(run_path, "w") as f:
        json.dump({"environment": env, "copy_bandwidth_gbps": copy_bw, "rows": records}, f, indent=1)
    paths = {"csv": csv_path, "jsonl": os.path.join(out_dir, "results.jsonl"), "run": run_path}
    png = plot(rows, env, out_dir)
    if png:
        paths["png"] = png
    elif png is None:
        print("no plot: matplotlib is not installed (pip install 'xclip-fast[bench]')")
    return paths
