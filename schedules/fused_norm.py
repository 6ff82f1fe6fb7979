"""GPU schedule of tvm_lite's fused norm kernels (``relax_passes/fuse_add_rms_norm.py``).

``add_rms_norm`` writes two outputs (the normalized rows and the residual sum), which none of
DLight's GPU rules takes: GeneralReduction and Reduction decline it and Fallback would cut it
into three launches (add, sum of squares, normalize), the very round trips the fusion removes.
This rule keys on the kernel's ``tvm_lite.fused`` attribute: one workgroup per row, the sum of
squares as a cross-thread reduction (the row's partial sums in shared memory), then the same
threads normalize their columns and store both outputs -- one kernel per call. ``rms_norm`` (one
output) gets the same schedule. Threads per row: 256, or the target's limit if lower.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from ..convention import NORM_ROW_STAT_BLOCK

FUSED_NORMS = ("add_rms_norm", "rms_norm")
THREADS = 256


class FusedRMSNorm(dl.ScheduleRule):
    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name in ("llvm", "c"):
            return None
        if func.attrs is None or str(func.attrs.get("tvm_lite.fused", "")) not in FUSED_NORMS:
            return None
        threads = min(THREADS, int(target.attrs.get("max_num_threads", THREADS)))
        sch = s_tir.Schedule(func)
        reduce_block, norm_block = sch.get_sblock(NORM_ROW_STAT_BLOCK), sch.get_sblock("rms_norm")
        *lead, k = sch.get_loops(reduce_block)
        row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        _, k_inner = sch.split(k, [None, threads])
        sch.bind(row, "blockIdx.x")
        sch.bind(k_inner, "threadIdx.x")
        sch.set_scope(reduce_block, 0, "shared")
        sch.reverse_compute_at(norm_block, row)
        j = sch.get_loops(norm_block)[-1]
        _, j_inner = sch.split(j, [None, threads])
        sch.bind(j_inner, "threadIdx.x")
        return sch
