"""Rows of the table from which ``backend="auto"`` chooses (``xclip_fast/auto_table.json``), from a GPU lab run.

    python benchmarks/auto_table.py benchmarks/results/<gpu>-<date>            # print the rows
    python benchmarks/auto_table.py benchmarks/results/<gpu>-<date> --write    # merge them into the table

The lab (``benchmarks/gpu_lab.py``) times our frame attention and SDPA on the concatenated input side by
side, by CUDA-graph replay, with the host's time per call apart. For each (dtype, l, N) it measured this
gives four rows, keyed as :class:`xclip_fast.autochoice.Key` (the lab's GPU architecture, head dim, the
bucket of l + 1 keys, the bucket of N sequences x heads):

- forward and training (forward + backward), each eager and compiled;
- ratio = SDPA's time over ours, against the fastest of SDPA's backends that ran (what PyTorch picks
  is one of them, so the ratio is never flattering); eager: each side's time is the larger of its GPU
  time and its host time per call (an eager call takes the longer of the two); compiled: GPU time;
- backend = ``"triton"`` when the ratio is at least :data:`xclip_fast.autochoice.MARGIN` and both were
  checked against float32, else ``"torch"``.

Only shapes the lab measured become rows: a key without a row keeps running SDPA. ``--write`` replaces
the rows of the same keys and keeps every other row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _times(fwd: dict, bwd: dict | None, training: bool, compiled: bool) -> float | None:
    """The time one side takes per call: GPU ms (compiled) or the larger of GPU and host ms (eager)."""
    if training and bwd is None:
        return None
    gpu = fwd["gpu_ms"] + (bwd["gpu_ms"] if training else 0.0)
    if compiled:
        return gpu
    host = (bwd if training else fwd).get("host_ms")  # (the bwd row's host ms is per forward + backward)
    return max(gpu, host) if host else gpu


def rows_from_lab(lab: dict, source: str = "") -> list[dict]:
    """The table rows a lab run supports (see the module doc); none from a dry run or a CPU."""
    from xclip_fast.autochoice import MARGIN, ROW_BUCKETS, SEQ_BUCKETS, _bucket

    env = lab["environment"]
    if lab.get("dry_run") or "arch" not in env:
        return []
    head_dim = int(lab.get("sizes", {}).get("head_dim", 64))
    groups: dict = {}
    for r in lab["kernels"]:
        if "l" in r and "N" in r and r.get("provider"):
            groups.setdefault((r["dtype"], int(r["l"]), int(r["N"])), []).append(r)
    rows = []
    for (dtype, l, N), found in sorted(groups.items()):
        ours = {r["direction"]: r for r in found if r["provider"] == "ours" and r.get("status") == "ok"}
        sdpa: dict = {}
        for r in found:
            name = r["provider"]
            if name.startswith("sdpa-") and not name.endswith("-alone") and r.get("status") == "ok":
                sdpa.setdefault(name, {})[r["direction"]] = r
        if "fwd" not in ours or not sdpa:
            continue
        for training in (False, True):
            for compiled in (False, True):
                mine = _times(ours["fwd"], ours.get("bwd"), training, compiled)
                theirs = {name: _times(d["fwd"], d.get("bwd"), training, compiled) for name, d in sdpa.items()
                          if "fwd" in d}
                theirs = {k: v for k, v in theirs.items() if v}
                if not mine or not theirs:
                    continue
                best = min(theirs, key=theirs.get)
                ratio = theirs[best] / mine
                how = "GPU time" if compiled else "the larger of GPU and host time per call"
                rows.append(dict(
                    arch=int(env["arch"]), dtype=dtype, head_dim=head_dim, seq=_bucket(l + 1, SEQ_BUCKETS),
                    rows=_bucket(N, ROW_BUCKETS), training=training, compiled=compiled,
                    backend="triton" if ratio >= MARGIN else "torch", ratio=round(ratio, 3),
                    against=f"{best} on the concatenated input (the fastest SDPA backend here)",
                    what=(f"frame attention, l = {l} + the message token, {N} sequences x heads, "
                          f"{'forward + backward' if training else 'forward'}, {how} (kernel lab): ours "
                          f"{mine:.4f} ms, SDPA {theirs[best]:.4f} ms"),
                    device=env.get("device", "?"), commit=env.get("commit", "?"),
                    date=str(env.get("timestamp", "?"))[:10], source=source))
    return rows


def merge(table: dict, rows: list[dict]) -> dict:
    """``table`` with ``rows`` in place of the rows of the same keys (every other row kept)."""
    from xclip_fast.autochoice import _key_of

    new = {_key_of(r): r for r in rows}
    kept = [r for r in table.get("rows", []) if _key_of(r) not in new]
    return dict(table, rows=kept + list(new.values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a folder holding a GPU lab's lab.json")
    parser.add_argument("--write", action="store_true", help="merge the rows into the table")
    parser.add_argument("--table", default=None, help="the table (default: xclip_fast/auto_table.json)")
    args = parser.parse_args(argv)
    from xclip_fast.autochoice import TABLE_PATH

    folder = Path(args.results)
    lab = json.loads((folder / "lab.json").read_text())
    rows = rows_from_lab(lab, source=str(folder / "lab.json"))
    for r in rows:
        print(f"{r['dtype']:9s} keys<={r['seq']:<5d} rows<={r['rows']:<6d} "
              f"{'training' if r['training'] else 'forward ':8s} {'compiled' if r['compiled'] else 'eager   '} "
              f"{r['backend']:6s} x{r['ratio']:.3f}  {r['what']}")
    if not rows:
        print("no rows: the lab ran dry, on a CPU, or measured no pair of ours and SDPA")
    if args.write and rows:
        path = Path(args.table or TABLE_PATH)
        table = json.loads(path.read_text()) if path.exists() else {"format": 1, "rows": []}
        path.write_text(json.dumps(merge(table, rows), indent=1) + "\n")
        print(f"wrote {len(rows)} rows into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
