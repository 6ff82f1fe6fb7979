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


def torch_kernels(run, steps: int) -> tuple[dict, float]:
    """(kernels, wall seconds per step) of ``run()`` (``steps`` steps) under torch.profiler:
    kernel name -> {"calls", "us"} per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kernels = defaultdict(lambda: {"calls": 0.0, "us": 0.0})
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k["calls"] += 1 / steps
            k["us"] += e.device_time_total / steps
    return dict(kernels), wall
