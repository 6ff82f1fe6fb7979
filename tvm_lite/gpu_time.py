"""GPU time of kernels, TVM's included, read through ``torch.profiler`` (CUDA activity, CUPTI).

torch's profiler records every kernel launched in the process, so it times TVM's CUDA kernels as
well as torch's. CUDA (and CUPTI) must be initialised by torch before TVM's first launch:
:func:`init_torch_cuda` does that. ``tvm_lite.profile`` and the benchmarks both read kernel times
here; this module imports nothing of tvm_lite.
"""

from __future__ import annotations

import time
from collections import defaultdict


def init_torch_cuda() -> bool:
    """Initialise CUDA through torch in this process (before TVM uses the GPU); False without
    torch's CUDA."""
    try:
        import torch

        torch.zeros(1, device="cuda")
        return True
    except (ImportError, RuntimeError, AssertionError):
        return False


def busy_time(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one kernel ran.
    Kernels that overlap (programmatic dependent launch: the next one resident and waiting while
    this one runs) count once, where the sum of their times counts the overlap twice."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def torch_kernels(run, steps: int) -> tuple[dict, float, float]:
    """(kernels, wall seconds per step, GPU busy microseconds per step) of ``run()`` (``steps``
    steps) under torch.profiler: kernel name -> {"calls", "us"} per step; busy is
    :func:`busy_time` of all the kernels' intervals."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kernels = defaultdict(lambda: {"calls": 0.0, "us": 0.0})
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k["calls"] += 1 / steps
            k["us"] += e.device_time_total / steps
            spans.append((e.time_range.start, e.time_range.end))
    return dict(kernels), wall, busy_time(spans) / steps
