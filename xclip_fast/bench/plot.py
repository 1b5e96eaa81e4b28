"""The plot of a run (optional: needs matplotlib)."""

from __future__ import annotations

import os

__all__ = ["plot"]


def _num(v):
    return float("nan") if v is None else v


def plot(rows, env, out_dir):
    """Speedup and memory against T per provider (block and encoder levels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = {}
    for r in rows:
        if r.status == "ok" and r.level in ("block", "encoder"):
            groups.setdefault((r.level, r.model, r.dtype, r.mode), []).append(r)
    if not groups:
        return ""  # nothing to plot (attention level only)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for (ax_s, ax_m), ((level, model, dtype, mode), rs) in zip(axes, sorted(groups.items())):
        for prov in sorted({r.provider for r in rs}):
            pts = sorted((r.frames, _num(r.speedup), _num(r.extra_mib)) for r in rs if r.provider == prov)
            ts = [p[0] for p in pts]
            ax_s.plot(ts, [p[1] for p in pts], marker="o", label=prov)
            ax_m.plot(ts, [p[2] for p in pts], marker="o", label=prov)
        for ax, what in ((ax_s, "speedup vs reference"), (ax_m, "memory MiB (above inputs+weights)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("frames T")
            ax.set_ylabel(what)
            ax.set_title(f"{level} {model} {dtype} {mode}", fontsize=9)
            ax.grid(alpha=0.3)
        ax_m.set_yscale("log")
        ax_s.legend(fontsize=7)
    fig.suptitle(f"{env['device']} - torch {env['torch']} - {env['timestamp']}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"bench-{env['timestamp'].replace(':', '').replace('-', '')}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
