"""The committed table of tuned tile sizes, read by :func:`xclip_fast.kernels.attention.launch_plan`.

``tuned.json`` beside this file holds the winners of ``benchmarks/tune.py`` (run on a GPU by
``benchmarks/gpu_check.sh``), keyed by GPU architecture (``90`` for H100/H200), dtype, head dim,
extra token and sequence bucket::

    {"format": 1, "entries": [
        {"arch": 90, "dtype": "bfloat16", "head_dim": 64, "extra": true, "seq_bucket": 256,
         "fwd": [64, 64, 4, 3], "dkdv": [32, 64, 4, 2], "dq": [64, 64, 4, 2],
         "measured": {"device": "...", "date": "...", "fwd_ms": ...}}]}

Each kernel entry is ``[BLOCK_M, BLOCK_N, num_warps, num_stages]``; a kernel missing from an entry
keeps its default tiles. No entry (or no file) means the defaults of ``default_tiles``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

__all__ = ["SEQ_BUCKETS", "seq_bucket", "lookup", "has_entries", "load_table", "TABLE_PATH"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")
# upper bounds of the sequence buckets (tokens per frame l, or frames T for the message attention)
SEQ_BUCKETS = (16, 64, 128, 256, 512, 1024, 4096, 1 << 62)
_KERNELS = ("fwd", "dkdv", "dq")


@dataclass(frozen=True)
class Entry:
    key: str
    fwd: object = None
    dkdv: object = None
    dq: object = None


def seq_bucket(n) -> int:
    """The bucket of a sequence length: the smallest bound in :data:`SEQ_BUCKETS` that holds it."""
    for bound in SEQ_BUCKETS:
        if n <= bound:
            return bound
    return SEQ_BUCKETS[-1]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH) -> dict:
    """``{(arch, dtype, head_dim, extra, seq_bucket): Entry}`` from the JSON table (empty if absent)."""
    from .attention import Tiles

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    if raw.get("format") != 1:
        raise ValueError(f"{path}: unknown tuning table format {raw.get('format')!r} (expected 1)")
    table = {}
    for e in raw.get("entries", []):
        key = (int(e["arch"]), e["dtype"], int(e["head_dim"]), bool(e["extra"]), int(e["seq_bucket"]))
        tiles = {k: Tiles(*map(int, e[k])) for k in _KERNELS if e.get(k)}
        table[key] = Entry(key=f"sm_{key[0]} {key[1]} D={key[2]} extra={key[3]} S<={key[4]}", **tiles)
    return table


@functools.lru_cache(maxsize=16)
def has_entries(arch: int) -> bool:
    """Whether the table holds anything for this architecture (else the bucket is not needed)."""
    return any(k[0] == arch for k in load_table())


def lookup(arch: int, dtype, head_dim: int, seq_bucket: int | None, has_extra: bool) -> Entry | None:
    """The tuned entry for this problem, or None (then the defaults apply)."""
    if seq_bucket is None:
        return None
    return load_table().get((int(arch), _dtype_name(dtype), int(head_dim), bool(has_extra), int(seq_bucket)))
