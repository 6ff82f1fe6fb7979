"""A reduction of a whole vector to one value on a GPU: the greedy token's max and first index.

``greedy_token`` (``relax_passes/add_step_helpers.py``) reduces the 49,152 logits of a row to
the first index of their max: one reduction of (index, value) pairs whose output is a single
element (it was two: the max, then the first index that holds it). DLight's ``gpu.Reduction`` only matches sum-like updates and its ``GeneralReduction``
does not take these either, so they fell to ``gpu.Fallback``: one thread looping over the whole
vector, a read-modify-write of global memory per element (about a millisecond per reduction on an
H200, measured as the whole decode step slowing from ~4.7 to ~7.3 ms).

This rule takes a function whose blocks, after inlining its elementwise producers, are one
reduction with static extents, followed by single-element epilogues (the argmax's index
arithmetic): it binds each output element (the spatial loops) to a workgroup and the reduction
to the ``threads`` threads of it, each reading a strided (coalesced) slice, and TVM lowers the
reduction over ``threadIdx.x`` to a cross-thread all-reduce (warp shuffles on CUDA, local memory
on OpenCL). Any commutative reducer works (max, min, sum, TOPI's argmax pairs). The greedy token
is two such functions: up to 128 slices of the row, a workgroup each, then one workgroup over
their maxima (one workgroup over a 128k-256k row took 80-88 us on an H200: one SM's reads).

Each thread's own loop is unrolled ``UNROLL`` deep, so its loads are issued together instead of
one per trip of a loop whose every trip waits on the last (the combiner's select). The loop was
rolled at first: the argmax of Llama-3.2-1B's 128,256 logits took 82.7 us on an H200 with 256
threads (about 500 dependent loads a thread), 11% of a decode step's GPU time.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.target import Target


class GPUScalarReduction(dl.ScheduleRule):
    """One reduction over a static extent of at least ``min_extent`` per output element (a
    workgroup each), with elementwise producers and single-element epilogues; ``threads``: the
    workgroup size (capped by the target's)."""

    def __init__(self, threads: int = 256, min_extent: int = 64):
        self.threads = threads
        self.min_extent = min_extent

    UNROLL = 8  # loads in flight per thread

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in (
                "cuda", "opencl", "vulkan", "metal", "rocm", "webgpu"):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or not infos[0].is_reduction() or not all(
                _single_element(sch, info) for info in infos[1:]):
            return None
        epilogues = [info.block_rv for info in infos[1:]]  # e.g. the argmax's index cast
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        kinds = infos[0].dom_kind()
        if len(kinds) != len(loops) or "O" in kinds:
            return None
        spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
        reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
        extents = [sch.get(lp).extent for lp in loops]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        if not reduce:
            return None
        total = 1
        for lp in reduce:
            total *= int(sch.get(lp).extent)
        if total < self.min_extent:
            return None
        threads = min(self.threads, int(target.attrs.get("max_num_threads", self.threads)))
        sch.reorder(*spatial, *reduce)
        outer = sch.fuse(*spatial) if spatial else sch.add_unit_loop(block)  # a workgroup each
        trips, tx = sch.split(sch.fuse(*reduce), [None, threads])
        if total >= threads * self.UNROLL:
            _, unrolled = sch.split(trips, [None, self.UNROLL])
            sch.unroll(unrolled)
        sch.bind(outer, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        for epi in epilogues:  # after the all-reduce, in the same kernel
            sch.reverse_compute_at(epi, outer, preserve_unit_loops=True)
        allocated = sch.get(sch.get_sblock("root")).alloc_buffers if epilogues else []
        for blk in [block, *epilogues]:  # results only the next block reads: registers
            for i, region in enumerate(sch.get(blk).writes):
                if any(b.same_as(region.source) for b in allocated):
                    sch.set_scope(blk, i, "local")
        return sch


def _single_element(sch, info) -> bool:
    """A spatial block of one element (an epilogue of a reduction to a single value)."""
    return not info.is_reduction() and all(
        isinstance(sch.get(lp).extent, tirx.IntImm) and int(sch.get(lp).extent) == 1
        for lp in sch.get_loops(info.block_rv))



__all__ = ["GPUScalarReduction"]
