"""Wall-clock timestamps that are honest on GPUs: CUDA work is asynchronous, so synchronize before reading."""

from __future__ import annotations

import time

import torch


def clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device has finished the work queued so far."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
