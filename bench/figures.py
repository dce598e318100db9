"""How every bench prints a figure: percentiles, milliseconds, throughput."""

from __future__ import annotations


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs`` (nearest rank; NaN for none)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s ({ms(seconds)})"
