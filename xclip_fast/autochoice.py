"""What ``backend="auto"`` runs for an attention on CUDA: our kernels only where they were measured to win.

A user who installs xclip-fast to train faster must never train slower because of it. So an attention call
on CUDA that the triton kernels could run has a :class:`Key` (GPU architecture, dtype, head dim, bucket of
the keys per sequence, bucket of sequences x heads, forward only or training, eager or compiled), and
``auto`` runs the triton kernels for it only on evidence; otherwise it runs PyTorch's SDPA on the
concatenated input, what the original model runs. The evidence, first found first used:

1. the choices :func:`tune` agreed on in this process (every rank of a process group takes rank 0's);
2. (eager calls, outside a process group of several ranks) the user's own measurement on this GPU,
   cached in ``auto-choices.json`` in the user's cache folder (:func:`cache_path`), used only by the GPU,
   driver, torch and triton versions that measured it: :func:`tune`, or ``XCLIP_FAST_AUTO_MEASURE=1``,
   which measures each new key the first time an eager call meets it;
3. the committed table ``auto_table.json`` (:data:`TABLE_PATH`): rows measured on lent GPUs
   (``benchmarks/gpu_lab.py``), each with its ratio, device, commit and date;
4. none: SDPA.

While a graph is traced (``torch.compile``, ``torch.export``) only the table applies: nothing is measured
there, and the user's measurement timed eager calls. A measurement times both candidates on the shape
the call had (the GPU's time by CUDA-graph replay and the host's time per call; an eager call takes the
longer of the two), checks our output against SDPA's, and chooses ours only when it is faster by
:data:`MARGIN` or more.

QuickGELU is not chosen here: on CUDA ``auto`` runs its one-pass kernel (measured at about the copy
bandwidth on the H200, where PyTorch eager makes three passes and Inductor fuses its own one).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Key", "Decision", "Call", "block_calls", "choose", "describe", "tune", "forget", "cache_path", "identity",
           "load_table", "TABLE_PATH", "MARGIN", "SEQ_BUCKETS", "ROW_BUCKETS", "MEASURE_ENV", "CACHE_ENV"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
MEASURE_ENV = "XCLIP_FAST_AUTO_MEASURE"
CACHE_ENV = "XCLIP_FAST_CACHE_DIR"
CACHE_FILE = "auto-choices.json"
FORMAT = 1
MARGIN = 1.03  # ours must be at least 3% faster than SDPA to be chosen: closer calls are within the timing noise
# upper bounds of the buckets: keys per sequence (with the extra token), sequences x heads
SEQ_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 4096, 1 << 62)
ROW_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 1 << 62)


def _bucket(n, bounds) -> int:
    for bound in bounds:
        if n <= bound:
            return bound
    return bounds[-1]


class Call(NamedTuple):
    """One attention call as ``auto`` sees it: ``batch`` sequences of ``seq_q`` queries over ``seq_k``
    keys (without the extra token), ``heads`` heads, ``extra`` one extra key/value per sequence,
    ``training`` whether autograd records it, ``packed`` whether q/k/v come as one packed tensor."""

    batch: int
    seq_q: int
    seq_k: int
    heads: int
    extra: bool
    training: bool
    packed: bool = True


class Key(NamedTuple):
    """What a choice is made for (see the module doc). ``seq`` and ``rows`` are bucket bounds. (A tuple:
    ``torch.compile`` traces a lookup by it.)"""

    arch: int
    dtype: str
    head_dim: int
    seq: int
    rows: int
    training: bool
    compiled: bool

    def describe(self) -> str:
        seq = "any" if self.seq == SEQ_BUCKETS[-1] else f"<={self.seq}"
        rows = "any" if self.rows == ROW_BUCKETS[-1] else f"<={self.rows}"
        return (f"sm_{self.arch} {self.dtype} D={self.head_dim} keys{seq} seqs x heads{rows} "
                f"{'training' if self.training else 'forward'} {'compiled' if self.compiled else 'eager'}")


@dataclass(frozen=True)
class Decision:
    """``backend`` (``"triton"`` or ``"torch"``) for a key, where the evidence came from (``source``:
    ``"agreed"``, ``"measured"``, ``"table"``, ``"none"``, or ``"limits"`` when the kernels cannot run the
    call) and why, in words."""

    backend: str
    source: str
    reason: str


# ------------------------------------------------------------------------------------------------
# the GPU, its identity, and whether a call is traced
# ------------------------------------------------------------------------------------------------
_ARCHS: dict = {}


@torch.compiler.assume_constant_result
def _device_arch(index: int) -> int:
    """(A constant for ``torch.compile``: evaluated once while tracing, never traced into.)"""
    if index not in _ARCHS:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCHS[index] = 10 * major + minor
    return _ARCHS[index]


def arch_of(device: torch.device) -> int | None:
    """The architecture (``90`` for sm_90) of a CUDA device, None for any other device (``auto`` then
    runs the torch backend; the tests stand a CPU in for a GPU by replacing this function)."""
    if device.type != "cuda":
        return None
    return _device_arch(device.index if device.index is not None else torch.cuda.current_device())


def _driver() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            for word in f.readline().split():
                if word[:1].isdigit() and "." in word:
                    return word
    except OSError:
        pass
    version = getattr(torch._C, "_cuda_getDriverVersion", None)
    return f"cuda-driver-api-{version()}" if version is not None else "unknown"


@functools.lru_cache(maxsize=16)
def identity(index: int = 0) -> dict:
    """What a cached measurement is valid for: the GPU's name and architecture, the driver, torch and
    triton versions."""
    import triton

    return {"gpu": torch.cuda.get_device_name(index), "arch": _device_arch(index), "driver": _driver(),
            "torch": torch.__version__, "triton": triton.__version__}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)


def tracing(t: torch.Tensor | None = None) -> bool:
    """Whether a graph is being traced around this call: ``torch.compile``/``torch.export``, a TorchScript
    trace, or a fake tensor (``make_fx``, the fake mode of a compile)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if t is None:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _can_measure(t: torch.Tensor) -> bool:
    """Whether a measurement may run now: eager, no ``torch.func`` transform, no CUDA-graph capture."""
    if tracing(t) or torch._C._are_functorch_transforms_active():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ------------------------------------------------------------------------------------------------
# the committed table
# ------------------------------------------------------------------------------------------------
def _key_of(row: dict, compiled=None) -> Key:
    return Key(int(row["arch"]), str(row["dtype"]), int(row["head_dim"]), int(row["seq"]), int(row["rows"]),
               bool(row["training"]), bool(row["compiled"] if compiled is None else compiled))


def _read_table(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown table format {raw.get('format')!r} (expected {FORMAT})")
    table = {}
    for row in raw.get("rows", []):
        if row["backend"] not in ("triton", "torch"):
            raise ValueError(f"{path}: a row's backend must be 'triton' or 'torch', got {row['backend']!r}")
        table[_key_of(row)] = row
    return table


_TABLE = _read_table(TABLE_PATH)  # read once: compiled graphs look rows up while they are traced


def load_table(path: str | None = None) -> dict:
    """``{Key: row}``: the committed table, or the one at ``path`` (read again)."""
    return _TABLE if path is None else _read_table(path)


def _table_decision(key: Key) -> Decision | None:
    row = _TABLE.get(key)
    if row is None:
        return None
    ratio = float(row["ratio"])
    return Decision(row["backend"], "table",
                    f"ours ran at {ratio:.2f}x {row['against']} on {row['device']} "
                    f"({row['what']}; commit {row['commit']}, {row['date']})")


# ------------------------------------------------------------------------------------------------
# the user's cache
# ------------------------------------------------------------------------------------------------
def cache_path() -> str:
    """The cache file: ``$XCLIP_FAST_CACHE_DIR/auto-choices.json``, else under ``$XDG_CACHE_HOME/xclip_fast``
    or ``~/.cache/xclip_fast``."""
    folder = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xclip_fast")
    return os.path.join(folder, CACHE_FILE)


_warned: set = set()


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(message, stacklevel=4)


def _read_cache(path: str) -> list:
    """The entries of a valid cache file; a missing file gives none, a corrupt or foreign one none
    and one warning."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict) or raw.get("producer") != "xclip_fast" or raw.get("format") != FORMAT:
            raise ValueError("not an xclip_fast auto-choice cache of format 1")
        entries = raw["entries"]
        for e in entries:
            _key_of(e["key"])
            float(e["ms"]["triton"]), float(e["ms"]["torch"])
            if e["backend"] not in ("triton", "torch") or not isinstance(e["identity"], dict):
                raise ValueError(f"bad entry {e!r:.80}")
        return entries
    except Exception as exc:  # any unreadable file: ignored, never trusted
        _warn_once(f"cache {path}", f"xclip_fast: ignoring the auto-choice cache {path} ({type(exc).__name__}: "
                   f"{exc}); backend='auto' uses the committed table, SDPA where it has no row")
        return []


def _cached(path: str, ident: dict) -> dict:
    """``{Key: entry}`` of the cache's entries measured by exactly this GPU, driver, torch and triton."""
    return {_key_of(e["key"]): e for e in _read_cache(path) if e["identity"] == ident}


def _write_cache(path: str, ident: dict, measured: dict) -> None:
    """Adds ``measured`` (``{Key: entry}``) to the cache file, replacing entries of the same identity and
    key and keeping every other entry; written to a temporary file, then moved into place."""
    keep = [e for e in _read_cache(path) if not (e["identity"] == ident and _key_of(e["key"]) in measured)]
    entries = keep + [dict(e, identity=ident, key=k._asdict()) for k, e in measured.items()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"producer": "xclip_fast", "format": FORMAT, "entries": entries}, f, indent=1)
    os.replace(tmp, path)


def _save(ident: dict, measured: dict) -> None:
    """Writes the measurements that succeeded into the cache; a cache that cannot be written is said once
    (the choices still apply to this process)."""
    good = {k: e for k, e in measured.items() if not e.get("error")}
    if not good:
        return
    try:
        _write_cache(cache_path(), ident, good)
    except OSError as exc:
        _warn_once(f"write {cache_path()}", f"xclip_fast: could not write the auto-choice cache {cache_path()} "
                   f"({exc}); the measured choices apply to this process only (set {CACHE_ENV} to a writable "
                   "folder)")


# ------------------------------------------------------------------------------------------------
# choosing
# ------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_agreed: dict = {}  # Key -> Decision, from tune()
_decided: dict = {}  # Key -> Decision, eager decisions of this process (so each key is decided once)
_met: dict = {}  # Key -> (Call, dtype, head_dim, device): the calls met, for tune()
_recording: list = []  # the active tune() recordings


def key_for(device: torch.device, dtype: torch.dtype, head_dim: int, call: Call, compiled: bool) -> Key | None:
    """The key of a call (None on a device without an architecture: not CUDA)."""
    arch = arch_of(device)
    return None if arch is None else _key(arch, dtype, head_dim, call, compiled)


def _key(arch: int, dtype: torch.dtype, head_dim: int, call: Call, compiled: bool) -> Key:
    return Key(arch, str(dtype).removeprefix("torch."), int(head_dim),
               _bucket(call.seq_k + call.extra, SEQ_BUCKETS), _bucket(call.batch * call.heads, ROW_BUCKETS),
               bool(call.training), compiled)


def block_calls(b: int, T: int, l: int, heads: int, training: bool) -> list[tuple[str, Call]]:
    """The two attention calls of a CCT block over ``b`` videos of ``T`` frames of ``l`` tokens:
    ``("frame attention", ...)`` (b*T sequences of l tokens and the message token) and
    ``("message attention", ...)`` (b sequences of T message tokens)."""
    return [("frame attention", Call(b * T, l, l, heads, True, training)),
            ("message attention", Call(b, T, T, heads, False, training))]


def _default(key: Key) -> Decision:
    return Decision("torch", "none", f"no measurement for {key.describe()}: SDPA on the concatenated input (what "
                    f"the original runs); measure on this GPU with xclip_fast.tune() or {MEASURE_ENV}=1")


def choose(device: torch.device, dtype: torch.dtype, head_dim: int, call: Call, like: torch.Tensor | None = None
           ) -> str:
    """``"triton"`` or ``"torch"`` for an attention call the kernels can run (see the module doc).
    ``like``: one of the call's tensors (whether it is traced, and the measurement's device)."""
    arch = arch_of(device)
    if arch is None:  # (not CUDA: the common case on a CPU, decided first)
        return "torch"
    if tracing(like):
        row = _TABLE.get(_key(arch, dtype, head_dim, call, True))  # (plain lookups: torch.compile traces them)
        return "torch" if row is None else row["backend"]
    key = _key(arch, dtype, head_dim, call, False)
    if key not in _met:
        _met[key] = (call, dtype, head_dim, device)
    for rec in _recording:  # (tune() measures the shape its own run met)
        rec.setdefault(key, (call, dtype, head_dim, device))
    decision = _agreed.get(key) or _decided.get(key)
    if decision is None:
        decision = _decide(key, call, dtype, head_dim, device, like)
    return decision.backend


def _decide(key: Key, call: Call, dtype, head_dim, device, like) -> Decision:
    """The first eager decision of ``key`` in this process (then remembered)."""
    with _lock:
        if key in _decided:
            return _decided[key]
        decision = _cache_decision(key, device)
        if decision is None and _world() == 1 and os.environ.get(MEASURE_ENV, "0") not in ("", "0") \
                and like is not None and _can_measure(like):
            entry = measure(call, dtype, head_dim, device)
            _save(identity(_device_index(device)), {key: entry})
            decision = _measured_decision(entry)
        if _world() > 1 and os.environ.get(MEASURE_ENV, "0") not in ("", "0"):
            _warn_once("measure in group", f"xclip_fast: {MEASURE_ENV}=1 is not used in a process group of "
                       f"{_world()} ranks (each would measure alone and could choose differently): call "
                       "xclip_fast.tune(...) on every rank, which gives every rank rank 0's choice")
        decision = decision or _table_decision(key) or _default(key)
        _decided[key] = decision
        return decision


def _cache_decision(key: Key, device: torch.device) -> Decision | None:
    """The user's cached measurement of ``key`` on this GPU, outside a process group of several ranks
    (where the ranks' machines could hold different files); None without one."""
    if _world() > 1:
        return None
    entry = _cached(cache_path(), identity(_device_index(device))).get(key)
    return None if entry is None else _measured_decision(entry)


def _measured_decision(entry: dict) -> Decision:
    if entry.get("error"):
        return Decision("torch", "measured", f"the measurement on this GPU failed ({entry['error']}): SDPA")
    ms = entry["ms"]
    return Decision(entry["backend"], "measured",
                    f"measured on this GPU ({entry.get('date', '?')}): ours {ms['triton']:.4f} ms, SDPA "
                    f"{ms['torch']:.4f} ms{'' if entry.get('agrees', True) else '; our output disagreed'}")


def describe(device: torch.device | str, dtype: torch.dtype, head_dim: int, call: Call, *,
             compiled: bool = False) -> Decision:
    """What ``auto`` runs for such a call on ``device`` and why, measuring nothing and remembering nothing
    (``xclip-fast check`` and the bench print it)."""
    from xclip_fast.ops import triton_limits

    device = torch.device(device)
    reasons = triton_limits(device, dtype, head_dim)
    if reasons:
        return Decision("torch", "limits", "; ".join(reasons))
    key = key_for(device, dtype, head_dim, call, compiled)
    if key is None:
        return Decision("torch", "limits", f"{device.type} tensors: auto runs the kernels on CUDA only")
    if compiled:
        return _table_decision(key) or _default(key)
    return (_agreed.get(key) or _decided.get(key) or _cache_decision(key, device) or _table_decision(key)
            or _default(key))


def forget() -> None:
    """Forget every decision of this process (the next eager call of each key decides again)."""
    with _lock:
        _agreed.clear()
        _decided.clear()
        _met.clear()


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def _inputs(call: Call, dtype, head_dim: int, device, seed: int = 0):
    """Random inputs of ``call`` laid out as the modules give them (q/k/v seq-first, views of one packed
    in-projection output), the gradient of the output, and the tensors whose gradients the call needs."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, D = call.batch, call.heads, head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    if call.packed:
        qkv = rnd(call.seq_q, B, 3, H, D).transpose(0, 1)
        args = [qkv]
    else:
        args = [rnd(call.seq_q, B, H, D).transpose(0, 1), rnd(call.seq_k, B, H, D).transpose(0, 1),
                rnd(call.seq_k, B, H, D).transpose(0, 1)]
    extra = []
    if call.extra:
        extra = [rnd(B, 2, H, D)] if call.packed else [rnd(B, H, D), rnd(B, H, D)]
    tensors = [t.requires_grad_(call.training) for t in args + extra]
    return tensors, rnd(B, call.seq_q, H, D)


def _candidate(call: Call, backend: str, tensors, grad):
    """One call of ``backend`` on the inputs (forward, or forward and backward); its ``backend``
    attribute names it (a fake timer tells the candidates apart by it)."""
    from xclip_fast.ops import attention, packed_attention

    def forward():
        return (packed_attention if call.packed else attention)(*tensors, backend=backend)

    def step():
        return torch.autograd.grad(forward(), tensors, grad)

    run = step if call.training else forward
    run.backend = backend
    return run


def _default_timer(device: torch.device):
    from xclip_fast.bench.gputime import CPUTimer, GraphTimer

    return GraphTimer(device) if device.type == "cuda" else CPUTimer()


def measure(call: Call, dtype: torch.dtype, head_dim: int, device, timer=None) -> dict:
    """Times our kernels and SDPA on ``call``'s shape (``timer``: a :class:`xclip_fast.bench.gputime.GraphTimer`
    by default: GPU time by graph replay, the host's time per call apart) and returns the cache entry:
    ``backend``; ``ms`` of each, the larger of its GPU and host time (what an eager call takes);
    ``gpu_ms``, ``host_ms``; whether our output agreed with SDPA's; the date. Ours is chosen only when it
    agrees and is faster by :data:`MARGIN`."""
    device = torch.device(device)
    timer = timer if timer is not None else _default_timer(device)
    # (a first call may meet a key inside the user's no_grad, inference or autocast region: none applies here)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            return _measure(call, dtype, head_dim, device, timer)
    except Exception as exc:  # (out of memory, a kernel that does not compile...): SDPA, and said why
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        return {"backend": "torch", "error": why, "date": datetime.date.today().isoformat()}


def _measure(call: Call, dtype, head_dim: int, device: torch.device, timer) -> dict:
    from xclip_fast.bench.gputime import measure_or_profile
    from xclip_fast.testing import TF32_TOLERANCE, TOLERANCES, rel_err

    tensors, grad = _inputs(call, dtype, head_dim, device)
    runs = {name: _candidate(call, name, tensors, grad) for name in ("triton", "torch")}
    outs = {name: fn() for name, fn in runs.items()}
    outs = {name: o if isinstance(o, torch.Tensor) else torch.cat([t.flatten() for t in o]) for name, o in outs.items()}
    # each is within its dtype's tolerance of the truth, so within twice that of each other (4x: slack)
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    bound = 4 * (TF32_TOLERANCE if tf32 else TOLERANCES[dtype])
    agrees = rel_err(outs["triton"].detach().double(), outs["torch"].detach().double()) <= bound
    timings = {name: measure_or_profile(timer, [fn], device) for name, fn in runs.items()}
    # an eager call takes the longer of its GPU time and the host's time to issue it
    ms = {name: max(t.ms, t.host_ms or 0.0) for name, t in timings.items()}
    wins = agrees and ms["triton"] * MARGIN <= ms["torch"]
    return {"backend": "triton" if wins else "torch", "ms": ms, "agrees": agrees,
            "gpu_ms": {name: t.ms for name, t in timings.items()},
            "host_ms": {name: t.host_ms for name, t in timings.items()}, "date": datetime.date.today().isoformat()}


def _agree(decisions: dict, group=None) -> dict:
    """Rank 0's decisions on every rank of ``group`` (the default group); unchanged outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return decisions
    src = dist.get_global_rank(group, 0) if group is not None else 0
    box = [decisions if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def tune(fn=None, *args, group=None, timer=None, save: bool = True, **kwargs) -> dict:
    """Measures on this GPU which attention ``backend="auto"`` should run, and makes it so.

    ``fn(*args, **kwargs)`` (an ``nn.Module`` or any callable, e.g. one training step) runs once, eagerly;
    every attention call in it that ``auto`` decides on CUDA is recorded with its shape, and for each
    key (:class:`Key`) our kernels and SDPA are timed on that shape (CUDA-graph replay; a training key
    forward and backward; calls inside a compiled graph are not recorded: compiled graphs take the table).
    Without ``fn``: the keys this process met so far. The choices apply at once
    to eager calls of this process and are saved (``save``) in :func:`cache_path` for later processes
    with the same GPU, driver, torch and triton; compiled graphs keep using the committed table.

    In a process group (``torch.distributed`` initialised) call it on every rank, like a collective: rank
    0 measures and every rank of ``group`` takes rank 0's choices, so DDP and frame parallelism compute
    the same way everywhere. Never while a graph is traced. Returns ``{Key: Decision}``.
    """
    import torch.distributed as dist

    if tracing():
        raise RuntimeError("xclip_fast.tune() measures eager calls: call it outside torch.compile / export")
    met: dict = {}
    if fn is not None:
        _recording.append(met)
        try:
            fn(*args, **kwargs)
        finally:
            _recording.remove(met)
    else:
        met = dict(_met)
    in_group = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    src = (dist.get_global_rank(group, 0) if group is not None else 0) if in_group else None
    mine: dict = {}
    if not in_group or dist.get_rank() == src:
        measured = {}
        for key, (call, dtype, head_dim, device) in sorted(met.items(), key=lambda kv: kv[0]):
            entry = measure(call, dtype, head_dim, device, timer)
            measured[key] = entry
            mine[key] = _measured_decision(entry)
        if save and measured:
            device = next(iter(met.values()))[3]
            _save(identity(_device_index(device)), measured)
    decisions = _agree(mine, group)
    if in_group and dist.get_rank() != src:
        decisions = {k: Decision(d.backend, "agreed", f"rank 0's measurement: {d.reason}")
                     for k, d in decisions.items()}
    with _lock:
        _agreed.update(decisions)
        for key in decisions:
            _decided.pop(key, None)
    return decisions
