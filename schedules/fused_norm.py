"""GPU schedule of tvm_lite's fused norm kernels (``relax_passes/fuse_add_rms_norm.py``).

``add_rms_norm`` writes two outputs (the normalized rows and the residual sum), which none of
DLight's GPU rules takes: GeneralReduction and Reduction decline it and Fallback would cut it
into three launches (add, sum of squares, normalize), the very round trips the fusion removes.
This rule keys on the kernel's ``tvm_lite.fused`` attribute: one workgroup per row, the sum of
squares as a cross-thread reduction (the row's partial sums in shared memory), then the same
threads normalize their columns and store both outputs -- one kernel per call. ``rms_norm`` (one
output) gets the same schedule.

Two layouts of a row over the workgroup's threads:

* **vectors** (:data:`VECTOR_LOADS`, on; profiles with ``vector_elementwise``: CUDA): thread
  ``t`` owns ``V`` consecutive columns (``V`` = the profile's ``vector_bytes`` of the row's
  dtype: 8 fp16), loaded once as one vector into registers for the sum of squares; the normalize
  step loads them (the row's second read, likely from cache) and the weight's as vectors,
  computes a lane at a time and stores vectors. Threads: the largest divisor of ``D / V`` up to
  :data:`THREADS` (2048 columns: 256 threads, one 16-byte load of each addend a thread;
  SmolLM2's 576: 72 threads).
* **columns** (the other profiles, and every profile while ``VECTOR_LOADS`` is off):
  :data:`THREADS` threads (or the target's limit), thread ``t`` taking columns ``t, t +
  THREADS, ...`` one 2-byte element at a time.

Why vectors on CUDA: under ncu (H100, Llama-1B, 2048 tokens; thirty-third session,
``results/issue16_small_kernels_ncu_llama1b_h100_s33.json``) the columns layout ran at 45-47% of
DRAM bandwidth, latency-bound (each warp waiting on its scalar loads: 2.6 waves of 256-thread
workgroups, 8 loads of each addend a thread in a chain).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from ..convention import NORM_ROW_STAT_BLOCK
from .profiles import GPUProfile, fit_to_target

FUSED_NORMS = ("add_rms_norm", "rms_norm")
THREADS = 256
# the vector layout on profiles with vector_elementwise (the module doc); False: the columns
# layout everywhere. Written in the thirty-fourth session. The kernel alone (H100, thirty-fifth
# session, ``python -m tvm_lite.bench.norm``): 0.99-1.22x less time with vectors, never slower
# beyond 0.01 us (2048 columns x 2048 rows: 10.29 against 11.38 us). The whole step (H100,
# thirty-sixth session, ``python -m tvm_lite.profile --prompt-len 2048 --chunk 256 --switch
# vec:schedules.fused_norm.VECTOR_LOADS=True``; ``results/
# issue16_norm_vectors_cast_fold_whole_step_h100_s36.json``): ``add_rms_norm`` of a 2048-token
# prompt 304 -> 266 us (Llama-3.2-1B) and 342 -> 309 us (Gemma-2B), of its eight 256-token
# chunks 680 -> 569 and 726 -> 681 us; Llama-1B's prompt 14.65 -> 14.35 ms of GPU time; every
# GPU test passed with it on (53 passed, 5 xfailed). On since.
VECTOR_LOADS = True


class FusedRMSNorm(dl.ScheduleRule):
    def __init__(self, profile: GPUProfile | None = None):
        self.profile = profile

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name in ("llvm", "c"):
            return None
        if func.attrs is None or str(func.attrs.get("tvm_lite.fused", "")) not in FUSED_NORMS:
            return None
        max_threads = min(THREADS, int(target.attrs.get("max_num_threads", THREADS)))
        sch = s_tir.Schedule(func)
        reduce_block, norm_block = sch.get_sblock(NORM_ROW_STAT_BLOCK), sch.get_sblock("rms_norm")
        *lead, k = sch.get_loops(reduce_block)
        row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.bind(row, "blockIdx.x")
        vec = self._vector(sch, reduce_block, target)
        if vec > 1:
            _vectors(sch, reduce_block, norm_block, row, k, vec, max_threads)
        else:
            _columns(sch, reduce_block, norm_block, row, k, max_threads)
        return sch

    def _vector(self, sch, reduce_block, target) -> int:
        """Columns a thread loads as one vector (1: the columns layout)."""
        if not VECTOR_LOADS or self.profile is None:
            return 1
        p = fit_to_target(self.profile, target)
        if not p.vector_elementwise:
            return 1
        row = next(r for r in sch.get(reduce_block).reads if len(r.region) > 1)
        bits = tvm.DataType(str(row.source.ty.dtype)).bits
        vec = max(1, p.vector_bytes * 8 // bits)
        d = int(sch.get(sch.get_loops(reduce_block)[-1]).extent)
        return vec if d % vec == 0 else 1


def _columns(sch, reduce_block, norm_block, row, k, threads: int) -> None:
    """The columns layout: thread ``t`` takes columns ``t, t + threads, ...``."""
    _, k_inner = sch.split(k, [None, threads])
    sch.bind(k_inner, "threadIdx.x")
    sch.set_scope(reduce_block, 0, "shared")
    sch.reverse_compute_at(norm_block, row)
    _, j_inner = sch.split(sch.get_loops(norm_block)[-1], [None, threads])
    sch.bind(j_inner, "threadIdx.x")


def _vectors(sch, reduce_block, norm_block, row, k, vec: int, max_threads: int) -> None:
    """The vector layout: thread ``t`` owns columns ``[t V, (t + 1) V)`` (``V = vec``), loaded
    and stored as vectors through registers."""
    lanes = int(sch.get(k).extent) // vec
    threads = max(t for t in range(1, min(max_threads, lanes) + 1) if lanes % t == 0)
    _, k_thread, _ = sch.split(k, [None, threads, vec])
    sch.bind(k_thread, "threadIdx.x")
    # each addend's vector into registers (the sum of squares reads them there)
    rows = [i for i, r in enumerate(sch.get(reduce_block).reads) if len(r.region) > 1]
    for i in reversed(rows):
        cached = sch.cache_read(reduce_block, i, "local", consumer_blocks=[reduce_block])
        sch.compute_at(cached, k_thread)
        sch.vectorize(sch.get_loops(cached)[-1])
    sch.set_scope(reduce_block, 0, "shared")
    sch.reverse_compute_at(norm_block, row)
    _, j_thread, j_vec = sch.split(sch.get_loops(norm_block)[-1], [None, threads, vec])
    sch.bind(j_thread, "threadIdx.x")
    # loads and stores as vectors through registers, the arithmetic a lane at a time (TVM
    # 0.27's CUDA codegen cannot broadcast an fp32 value to 8 lanes: a vectorized fp16 row's
    # fp32 math makes make_ulonglong4 with 8 arguments, which nvcc rejects)
    stat = sch.get(reduce_block).writes[0].source
    rows = [i for i, r in enumerate(sch.get(norm_block).reads) if not r.source.same_as(stat)]
    for i in reversed(rows):
        cached = sch.cache_read(norm_block, i, "local", consumer_blocks=[norm_block])
        sch.compute_at(cached, j_thread)
        sch.vectorize(sch.get_loops(cached)[-1])
    for i in reversed(range(len(sch.get(norm_block).writes))):
        cached = sch.cache_write(norm_block, i, "local")
        if not any(sch.get(loop).same_as(sch.get(j_thread)) for loop in sch.get_loops(cached)):
            sch.reverse_compute_at(cached, j_thread)  # (else cache_write put it there)
        sch.vectorize(sch.get_loops(cached)[-1])
    sch.unroll(j_vec)
