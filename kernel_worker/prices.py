"""What a GPU-second costs: list prices per model, and the way clouds round a bill.

The defaults are public on-demand list prices per GPU-hour as we last read them; they
are a starting point for a host's own figures (``c.Ledger.prices``), not a quote.
"""

from __future__ import annotations

import math

DEFAULT_PRICES = {
    # Lambda Cloud on-demand, 8x H200 SXM instance, per GPU (lambda.ai/service/gpu-cloud#pricing).
    "H200": 3.79,
    # Lambda Cloud on-demand, 8x H100 SXM instance, per GPU (lambda.ai/service/gpu-cloud#pricing).
    "H100": 2.99,
    # Lambda Cloud on-demand, 8x A100 SXM 80 GB instance, per GPU (same page).
    "A100-80GB": 1.79,
    # Lambda Cloud on-demand, 1x A100 PCIe 40 GB instance (same page).
    "A100-40GB": 1.29,
    # RunPod Secure Cloud on-demand L40S (runpod.io/pricing).
    "L40S": 0.99,
    # Lambda Cloud on-demand, 1x A10 24 GB instance (same page as H100).
    "A10G": 0.75,
    # Google Cloud G2 (L4) GPU-only on-demand price, us-central1 (cloud.google.com/compute/gpus-pricing).
    "L4": 0.58,
    # Google Cloud T4 GPU-only on-demand price, us-central1 (cloud.google.com/compute/gpus-pricing).
    "T4": 0.35,
    # A worker with no GPU: the host's CPU time is not billed.
    "cpu": 0.0,
}


def billed_seconds(seconds: float, increment_s: float = 0.0, minimum_s: float = 0.0) -> float:
    """``seconds`` as a cloud bills them: rounded up to whole ``increment_s`` (0: exact),
    never less than ``minimum_s``."""
    if increment_s > 0:
        seconds = math.ceil(seconds / increment_s - 1e-9) * increment_s
    return max(seconds, minimum_s)


def limit_text(usd: float) -> str:
    """A spending limit as its owner wrote it: ``$2.00``, ``$0.002``."""
    return f"${usd:.2f}" if round(usd, 2) == usd else f"${usd:.6g}"
