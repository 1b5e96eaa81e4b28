"""Launch plans of the attention kernels: tiles, warps and stages, and the committed tuning table.

:func:`launch_plan` gives every compile-time choice for one (head dim, dtype, extra token, TF32, GPU
architecture) as a frozen :class:`LaunchPlan`. The default tiles come from ``ptxas`` register/spill
reports and shared-memory sizes of the sm_90 compiles (``tests/aot_compile.py``; no GPU timing behind
them); other architectures get the same tiles with a shallower forward pipeline. Where ``tuned.json`` (written by
``benchmarks/tune.py`` on a GPU, committed) has an entry for the running GPU's architecture, the dtype,
the head dim, the extra token and the sequence bucket, that entry wins::

    {"format": 2, "entries": [
        {"arch": 90, "dtype": "bfloat16", "head_dim": 64, "extra": true, "seq_bucket": 256,
         "fwd": [64, 64, 4, 3], "bwd": [32, 64, 8, 2], "bwd_per_sm": 1,
         "measured": {"device": "...", "date": "...", "ms": {...}}}]}

Each kernel entry is ``[BLOCK_M, BLOCK_N, num_warps, num_stages]`` for one of :data:`KERNELS`: the
sequence kernels' ``fwd`` and one-launch ``bwd`` (BLOCK_M the query chunk, BLOCK_N the key chunk), the
packed kernels' ``packed_fwd``, ``packed_dkdv`` and ``packed_dq``; ``bwd_per_sm`` is the sequence
backward's persistent programs per SM. A kernel missing from an entry keeps its default tiles.
Entries with ``"op": "quick_gelu"`` (keyed by arch and dtype) hold the elementwise kernels' ``"block"``
and ``"num_warps"``. Sequence buckets are coarse, so a new frame count recompiles at most when it
crosses one; the packing factor G is a runtime argument and never recompiles. (Format 1 held the tiles
of the kernels these replaced, a three-launch backward: its entries mean nothing to these kernels.)
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton

from . import acc_dtype, tl_dtype

__all__ = ["Tiles", "LaunchPlan", "default_tiles", "launch_plan", "pack_group", "plan_for", "seq_bucket",
           "load_table", "clear_caches", "quick_gelu_config", "sm_count", "TABLE_PATH", "SEQ_BUCKETS", "LOG2E",
           "QUICK_GELU_DEFAULT", "KERNELS", "DEFAULT_SMS"]

LOG2E = 1.4426950408889634
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")
# upper bounds of the sequence buckets (tokens per frame l, or frames T of the message attention)
SEQ_BUCKETS = (16, 64, 128, 256, 512, 1024, 4096, 1 << 62)
KERNELS = ("fwd", "bwd", "packed_fwd", "packed_dkdv", "packed_dq")
QUICK_GELU_DEFAULT = (1024, 4)  # (elements per program, warps)
# the SM count planned for where a device's cannot be read: the CPU under Triton's interpreter (small, so
# that the tests reach both the persistent and the split backward), a CUDA tensor without a GPU (an H100)
DEFAULT_SMS = {"cpu": 8, "cuda": 132}


@dataclass(frozen=True)
class Tiles:
    """Tile sizes, warps and pipeline stages of one kernel launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 2


@dataclass(frozen=True)
class LaunchPlan:
    """Every compile-time choice of the attention kernels for one (head dim, dtype, extra, tf32, arch).

    ``fwd`` and ``bwd`` are the tiles of the sequence kernels' forward and one-launch backward,
    ``bwd_per_sm`` the backward's persistent programs per SM; ``packed_fwd``, ``packed_dkdv`` and
    ``packed_dq`` those of the packed kernels (``packed_fwd`` also sets how many sequences share a
    program), ``packed_delta`` the row tile of their ``delta`` pass; ``source`` says where the tiles come
    from (``"default"`` or a tuning-table entry).
    """

    head_dim: int
    block_d: int
    has_extra: bool
    precision: str  # "ieee" (exact fp32 / fp64; ignored for 16-bit inputs) or "tf32"
    acc: object  # tl.float32 or tl.float64
    fwd: Tiles
    bwd: Tiles
    packed_fwd: Tiles
    packed_dkdv: Tiles
    packed_dq: Tiles
    packed_delta: Tiles
    bwd_per_sm: int
    dq_t: bool  # the sequence backward computes dq transposed (16-bit inputs: see the kernel's DQ_T)
    source: str = "default"

    def constexprs(self) -> dict:
        """The compile-time arguments every attention kernel takes."""
        return dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, PRECISION=self.precision, ACC=self.acc)


def default_tiles(block_d: int, dtype: torch.dtype, arch: int | None = None) -> dict:
    """``{kernel: Tiles}`` for each of :data:`KERNELS` without a tuning entry, for GPU architecture
    ``arch`` (e.g. 90; None: the CPU interpreter). Every ``tl.dot`` dimension is at least 16 (a GPU
    requirement the interpreter does not enforce). The sequence kernels' tiles at 16 bits are the
    largest that compile for sm_90 without spilling registers at head dim 64 with every product a
    warpgroup MMA (key chunks of 64: a wgmma needs 64 rows; at head dim 128 and in fp64 the backward
    spills least at these); on sm_90 the sequence forward pipelines its key tiles three deep (under
    120 KB of shared memory), elsewhere two. Results: ``benchmarks/results/sm90-aot-2026-12-06``."""
    stages = 3 if arch is not None and arch >= 90 else 2
    if dtype == torch.float64:
        tiles = (Tiles(32, 32, 8), Tiles(16, 16, 8), Tiles(32, 32, 4), Tiles(16, 32, 4), Tiles(32, 32, 4))
    elif dtype == torch.float32:
        tiles = (Tiles(32, 32, 4), Tiles(16, 32, 4), Tiles(32, 32, 4), Tiles(16, 32, 4), Tiles(32, 32, 4))
    elif block_d <= 64:
        tiles = (Tiles(64, 64, 4, stages), Tiles(32, 64, 8), Tiles(64, 64, 4), Tiles(32, 64, 4), Tiles(64, 32, 4))
    else:
        tiles = (Tiles(64, 64, 4, stages), Tiles(16, 64, 8), Tiles(64, 64, 8), Tiles(16, 64, 4), Tiles(64, 64, 8))
    return dict(zip(KERNELS, tiles))


# ----------------------------------------------------------------------------------------------
# the tuning table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    key: str
    tiles: dict


def seq_bucket(n) -> int:
    """The bucket of a sequence length: the smallest bound in :data:`SEQ_BUCKETS` that holds it."""
    for bound in SEQ_BUCKETS:
        if n <= bound:
            return bound
    return SEQ_BUCKETS[-1]


def load_table(path: str | None = None) -> dict:
    """``{(arch, dtype name, head_dim, extra, seq_bucket): entry}`` from the JSON table (empty if
    absent); default: :data:`TABLE_PATH`."""
    return _load_table(path or TABLE_PATH)


@functools.lru_cache(maxsize=4)
def _load_table(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    if raw.get("format") != 2:
        raise ValueError(f"{path}: tuning table format {raw.get('format')!r}, expected 2 (format 1 tuned the "
                         "three-launch backward these kernels replaced: run benchmarks/tune.py again)")
    table = {}
    for e in raw.get("entries", []):
        if e.get("op", "attention") == "quick_gelu":
            table[("quick_gelu", int(e["arch"]), str(e["dtype"]))] = (int(e["block"]), int(e["num_warps"]))
            continue
        key = (int(e["arch"]), str(e["dtype"]), int(e["head_dim"]), bool(e["extra"]), int(e["seq_bucket"]))
        unknown = set(e) - {"arch", "dtype", "head_dim", "extra", "seq_bucket", "measured", "bwd_per_sm", *KERNELS}
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)} in the entry {key}")
        tiles = {k: Tiles(*map(int, e[k])) for k in KERNELS if e.get(k)}
        if e.get("bwd_per_sm"):
            tiles["bwd_per_sm"] = int(e["bwd_per_sm"])
        table[key] = _Entry(f"sm_{key[0]} {key[1]} D={key[2]} extra={key[3]} S<={key[4]}", tiles)
    return table


def clear_caches() -> None:
    """Forget the loaded table and the plans made from it (after ``TABLE_PATH`` or the file changed)."""
    _load_table.cache_clear()
    _has_entries.cache_clear()
    launch_plan.cache_clear()


@functools.lru_cache(maxsize=16)
def _has_entries(arch: int) -> bool:
    return any(k[0] == arch for k in load_table() if k[0] != "quick_gelu")


# ----------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def launch_plan(head_dim: int, dtype: torch.dtype, has_extra: bool, allow_tf32: bool,
                arch: int | None = None, bucket: int | None = None) -> LaunchPlan:
    """The launch plan of one problem (frozen and cached; tests compile each one ahead of time).
    ``arch`` (e.g. 90) and ``bucket`` (:func:`seq_bucket`) select a tuning-table entry if one exists."""
    head_dim = int(head_dim)
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = default_tiles(block_d, dtype, arch)
    source = "default"
    entry = None
    if arch is not None and bucket is not None:
        entry = load_table().get((int(arch), str(dtype).removeprefix("torch."), head_dim, bool(has_extra), bucket))
    if entry is not None:
        tiles.update(entry.tiles)
        source = entry.key
    precision = "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"
    # persistent backward programs per SM: as many as fit in the register file (up to 255 registers x
    # 256 threads fill an SM's 64K), unless the table says otherwise
    tiles.setdefault("bwd_per_sm", max(1, 8 // tiles["bwd"].num_warps))
    return LaunchPlan(head_dim=head_dim, block_d=block_d, has_extra=has_extra, precision=precision,
                      dq_t=dtype in (torch.float16, torch.bfloat16),
                      acc=tl_dtype(acc_dtype(dtype)), packed_delta=Tiles(64, 1, 4, 1), source=source, **tiles)


def pack_group(plan: LaunchPlan, sq, sk):
    """Sequences packed per program: several short sequences share one tile (block-diagonal mask).
    The extra token is per sequence and seeds the whole tile, so packing is only used without it."""
    t = plan.packed_fwd
    if plan.has_extra or 2 * sq > t.block_m or 2 * sk > t.block_n:
        return 1
    return min(t.block_m // sq, t.block_n // sk)


@functools.lru_cache(maxsize=16)
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _arch_of(t: torch.Tensor) -> int:
    return _device_arch(_device_index(t))


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """The SM count of ``t``'s GPU (:data:`DEFAULT_SMS` where it cannot be read)."""
    if t.device.type == "cuda" and torch.cuda.is_available():
        return _cuda_sms(_device_index(t))
    return DEFAULT_SMS.get(t.device.type, DEFAULT_SMS["cpu"])


def quick_gelu_config(x: torch.Tensor) -> tuple[int, int]:
    """(elements per program, warps) of the QuickGELU kernels for ``x``: tuned on its GPU, else the default."""
    if x.device.type != "cuda":
        return QUICK_GELU_DEFAULT
    return load_table().get(("quick_gelu", _arch_of(x), str(x.dtype).removeprefix("torch.")), QUICK_GELU_DEFAULT)


def plan_for(q: torch.Tensor, sk, has_extra: bool, allow_tf32: bool) -> LaunchPlan:
    """The plan the launchers use for queries ``q: [B, SQ, H, D]`` and ``sk`` keys; the tuning table
    is consulted on CUDA devices whose architecture it has entries for."""
    head_dim = int(q.shape[3])  # a compile-time constant of the kernels (specialised while tracing)
    if q.device.type != "cuda":
        return launch_plan(head_dim, q.dtype, has_extra, allow_tf32)
    arch = _arch_of(q)
    if not _has_entries(arch):
        return launch_plan(head_dim, q.dtype, has_extra, allow_tf32, arch)
    return launch_plan(head_dim, q.dtype, has_extra, allow_tf32, arch, seq_bucket(torch.sym_max(q.shape[1], sk)))
