"""Reductions on GPUs (norms, softmax, sums): DLight's stock rules, in the order tvm_lite wants.

DLight's ``gpu.Reduction`` (one reduction block, cross-thread over the reduced axis, with the
injective producers/epilogue it can fold) and ``gpu.GeneralReduction`` (several reductions over
the same axis: softmax's max and sum, RMSNorm's sum of squares then the scale) already schedule
these well: both size their thread count from the target's ``max_num_threads`` and lower the
cross-thread sum to warp shuffles on CUDA and to local memory on Adreno/Mali (warp size 1 in
TVM's OpenCL targets). They take no other parameters, so the profile has nothing to pass them;
this file only fixes which ones run and in what order.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl

from .profiles import GPUProfile


def reduction_rules(profile: GPUProfile) -> list:
    """The reduction rules for a GPU profile (the same for all four today): DLight's, then
    tvm_lite's reduction of a whole vector to one element (``gpu_scalar_reduction.py``, a
    workgroup of the profile's most threads)."""
    from .gpu_scalar_reduction import GPUScalarReduction

    return [dl.gpu.Reduction(), dl.gpu.GeneralReduction(), GPUScalarReduction(threads=profile.max_threads)]


__all__ = ["reduction_rules"]
