"""The problem sizes of a benchmark run."""

from __future__ import annotations

from dataclasses import dataclass

from xclip_fast.encoder import PRESETS

__all__ = ["LEVELS", "MODES", "Case", "model_dims", "default_frames", "build_cases"]

LEVELS = ("attention", "block", "encoder")
MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Case:
    """One problem size. ``kind``: ``frames`` / ``messages`` (attention), ``block``, ``encoder``."""

    level: str
    kind: str
    model: str
    batch: int  # videos b
    frames: int  # T
    tokens: int  # l (0 for message attention)
    width: int
    heads: int
    chunk_frames: int = 0

    @property
    def label(self) -> str:
        if self.kind == "frames":
            return f"frame attn {self.model} l={self.tokens} N={self.batch * self.frames}"
        if self.kind == "messages":
            return f"message attn T={self.frames} b={self.batch}"
        return f"{self.kind} {self.model} b={self.batch} T={self.frames}"


def model_dims(model: str) -> tuple[int, int, int]:
    """(width, heads, tokens per frame l) of a preset."""
    p = PRESETS[model]
    return p["width"], p["heads"], (p["input_resolution"] // p["patch_size"]) ** 2 + 1


def default_frames(level: str, quick: bool, cuda: bool) -> list[int]:
    """T values of the block and encoder levels when ``--frames`` is not given: the released 8, 16,
    32 plus long clips (block, on GPU 64 ... 512), 8 ... 1024 for the encoder on GPU."""
    if quick:
        return [8]
    if level == "block":
        return [8, 16, 32, 64, 128, 256, 512] if cuda else [8, 32]
    return [8, 32, 128, 512, 1024] if cuda else [8, 32]


def build_cases(levels, model: str, frames: list[int] | None, batch: int, quick: bool, cuda: bool) -> list[Case]:
    """The problem sizes of a run. Block level: ``batch`` videos for T <= 32, one video for the long
    clips; encoder level: one video; ``frames`` (if given) replaces the T values of both."""
    width, heads, l = model_dims(model)
    cases = []
    if "attention" in levels:
        if quick:
            cases += [Case("attention", "frames", model, 2, 8, l, width, heads)]
            cases += [Case("attention", "messages", model, b, t, 0, width, heads) for t, b in ((8, 2), (64, 1))]
        else:
            n = 256 if cuda else 32  # frames per launch (DESIGN.md §6: N = 256, 12 heads of 64)
            for m in ("b32", "b16", "l14"):
                cases.append(Case("attention", "frames", m, n // 8, 8, model_dims(m)[2], 12 * 64, 12))
            for t in (8, 32, 256, 1024) if cuda else (8, 32, 256):
                cases.append(Case("attention", "messages", model, max(1, n // t), t, 0, 12 * 64, 12))
    if "block" in levels:
        for t in frames or default_frames("block", quick, cuda):
            cases.append(Case("block", "block", model, batch if t <= 32 else 1, t, l, width, heads))
    if "encoder" in levels:
        chunk = 4 if quick else 8
        for t in frames or default_frames("encoder", quick, cuda):
            cases.append(Case("encoder", "encoder", model, 1, t, l, width, heads, chunk_frames=min(t, chunk)))
    return cases
