"""Option types of the ``xclip-fast`` commands: each refuses a bad value with an
``argparse.ArgumentTypeError`` (argparse then exits with code 2 before any work)."""

from __future__ import annotations

import argparse
import math

import torch

__all__ = ["parse_device", "device_arg", "positive_int", "positive_float", "frame_list", "span", "fast_backends",
           "int_range"]


def parse_device(text: str | None) -> torch.device:
    """``--device``: ``cpu`` or ``cuda[:i]`` (default: cuda when available), and only a device this
    machine has (an ``argparse.ArgumentTypeError`` otherwise, before any work)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu or cuda[:i])") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported (cpu or cuda[:i])")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {torch.cuda.device_count()} "
                                             "CUDA device(s)")
    return device


def device_arg(text: str) -> str:
    """argparse type: a device string :func:`parse_device` accepts (kept as text)."""
    parse_device(text)
    return text


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def span(text: str) -> str:
    """argparse type: a window or stride, frames (``16``) or seconds (``4s``), finite and > 0."""
    from xclip_fast.extract import parse_span

    try:
        parse_span(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def fast_backends(text: str) -> str:
    """argparse type: a comma list of fast backends."""
    names = [b.strip() for b in text.split(",")]
    bad = [b for b in names if b not in ("torch", "triton")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of torch,triton, got {text!r}")
    return ",".join(names)


def _at_least_one(text: str, not_int: str, too_small) -> int:
    """``int(text)`` when it is >= 1; else an ``ArgumentTypeError`` saying ``not_int`` or ``too_small(value)``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(not_int) from None
    if value < 1:
        raise argparse.ArgumentTypeError(too_small(value))
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _at_least_one(text, f"expected an integer, got {text!r}", lambda v: f"must be >= 1, got {v}")


def frame_list(text: str) -> list[int]:
    """A comma list of frame counts, each an int >= 1."""
    return [_at_least_one(part, f"expected a comma list of ints >= 1, got {text!r}",
                          lambda v: f"every frame count must be >= 1, got {v} in {text!r}") for part in text.split(",")]


def int_range(text: str) -> tuple[int, int]:
    """argparse type: ``MIN:MAX`` (or one value N, meaning N:N), ints with 1 <= MIN <= MAX."""
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX (or one int >= 1), got {text!r}")
    return low, high
