"""Prefill GEMM on GPUs: ``Y[1, n, N] = X[1, n, K] @ W[K, N]``, ``n`` the dynamic sequence length.

One kernel serves every prompt length (``n`` is padded up to the tile inside the kernel: rows
past ``n`` read zeros and are never written). Weights are fp16 or tvm_lite's 4-bit codes; for
4-bit weights the ``dequantize`` block is computed *while the weight tile is loaded into local
memory*, so the fp16 matrix never exists in global memory. The schedule (sizes from the profile)::

    workgroup (blockIdx.y: n / TM row tiles, blockIdx.x: N / TN column tiles)
      thread (threadIdx.y = tm, threadIdx.x = tn), each owning an [mm, mn] register tile
        for ko in K / TK:
          X[TM, TK]            -> local memory (cooperative, vectorized, zero past n)
          dequant(W)[TK, TN]   -> local memory (cooperative: packed words read along N,
                                  coalesced, dequantized in registers on the way)
          barrier; for k in TK: acc[mm, mn] += X_s[., k] * W_s[k, .]   (registers)
        acc -> Y (+ the injective epilogue)

``TM = tm * mm`` and ``TN = tn * mn``; a thread's ``mn`` columns are strided by ``tn`` (``mn``
virtual threads) so that neighbouring threads read neighbouring local-memory words (no bank
conflicts on the W tile) while each keeps a compact register tile.

On CUDA the profile asks for tensor cores (``gemm_tensor_cores``): there tvm_lite's
``mma.sync`` kernel (:mod:`.gpu_gemm_mma`: fp16 activations, fp16/E0M4/int4 weights dequantized
as they are staged) is tried first, then DLight's ``MatmulTensorization`` (wmma 16x16x16
fragments; the dequant inlined into its shared-memory load of the weight tile: what ran before,
kept for what the mma kernel does not take), and this SIMT schedule is the fallback. Adreno and Mali
(and the generic profile) have no such units and use the SIMT schedule.

Measured on an H200 (``tvm-lite bench-kernels``, n = 128..2048): on CUDA the rule's kernel *is*
DLight's tensor-core kernel, so tvm_lite E0M4 = stock DLight on the same E0M4 function, and both
run 1.5-1.8x the TFLOP/s of stock DLight's fp16 matmul (a quarter of the weight bytes through
the same tiles). The SIMT schedule (Adreno/Mali's) runs at 0.25-0.3x of the tensor-core one
there: 3.9-39.8 TFLOP/s on the 2B matrices.
"""

from __future__ import annotations

from dataclasses import replace

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain

from .gpu_gemm_mma import mma_gemm_kernel
from . import gpu_gemm_wgmma
from .gpu_gemm_wgmma import wgmma_gemm_kernel
from .gpu_gemm_wgmma_ws import deep_gemm_kernel, mid_gemm_kernel, ws_gemm_kernel
from .gpu_gemm_wgmma_wreg import default_kernel as wreg_default_kernel
from .gpu_gemm_wgmma_wreg import wreg_gemm_kernel
from .gpu_gemv import MatchError, check_all_bound, match_matmul
from .profiles import GPUProfile, fit_to_target


def _divisor(n: int, limit: int) -> int:
    d = 1
    while d * 2 <= limit and n % (d * 2) == 0:
        d *= 2
    return d


class GPUPrefillGEMM(dl.ScheduleRule):
    """Tiled GEMM for a dynamic (or > 1) ``M``, fp16 or dequantized weights, from a profile."""

    def __init__(self, profile: GPUProfile, tensor_cores: bool | None = None, mma: bool = True,
                 split_k: bool = True, mma_tile: tuple | None = None,
                 x_async: bool | None = None, wgmma: bool | None = None,
                 wgmma_tile: tuple | None = None, wgmma_x_stages: int | None = None,
                 wgmma_specialised: int = 0, wgmma_ablate: tuple = (),
                 wgmma_w_buffers: int | None = None, wgmma_pair_stores: bool = False,
                 wgmma_x_rows: bool = False, wgmma_staged_stores: bool = False,
                 wgmma_w_in_registers: int = 0, plan_lengths: tuple | None = None,
                 wgmma_cluster_sum: bool = False, wgmma_consumer_units: int | None = None):
        self.profile = profile
        self.tensor_cores = profile.gemm_tensor_cores if tensor_cores is None else tensor_cores
        self.mma = mma  # False: DLight's WMMA kernel only (what ran before; benchmarks)
        self.split_k = split_k  # False: the mma kernel never splits K (benchmarks)
        self.mma_tile = mma_tile  # (TM, TN, WM, WN, KS[, TK]) forced on every GEMM (tile sweeps)
        self.x_async = x_async  # the mma kernel's X by cp.async (None: gpu_gemm_mma.X_ASYNC)
        # Hopper's wgmma kernel first on an sm_90a target (None: gpu_gemm_wgmma.ENABLED)
        self.wgmma = wgmma
        self.wgmma_tile = wgmma_tile  # (TM, TN[, KS]) forced on the wgmma kernel (sweeps)
        self.wgmma_x_stages = wgmma_x_stages  # its X staging (None: gpu_gemm_wgmma.X_STAGES)
        # > 0: the warp-specialised wgmma kernel with this many stages (gpu_gemm_wgmma_ws)
        self.wgmma_specialised = wgmma_specialised
        self.wgmma_ablate = wgmma_ablate  # its parts left out (diagnostics: wrong results)
        self.wgmma_w_buffers = wgmma_w_buffers  # its fp16 W slices (None: one a stage)
        self.wgmma_pair_stores = wgmma_pair_stores  # its outputs stored two at a time
        self.wgmma_x_rows = wgmma_x_rows  # its X copied a row segment a warp quarter
        self.wgmma_staged_stores = wgmma_staged_stores  # its outputs through shared memory
        self.wgmma_cluster_sum = wgmma_cluster_sum  # its split K summed in a cluster
        # its consumers' share of the dequant (None: gpu_gemm_wgmma_ws.CONSUMER_UNITS)
        self.wgmma_consumer_units = wgmma_consumer_units
        # > 0: the kernel with W dequantized in registers, this many stages (gpu_gemm_wgmma_wreg;
        # wgmma_tile is then (tokens, features), wgmma_x_rows its X copy)
        self.wgmma_w_in_registers = wgmma_w_in_registers
        # prompt lengths the tensor-core kernels are planned for, one kernel each (None:
        # gpu_gemm_mma.PLAN_LENGTHS; see gpu_gemm_mma.lengths_for)
        self.plan_lengths = plan_lengths

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or "gpu" not in target.keys:
            return None
        try:
            match_matmul(s_tir.Schedule(func), decode=False)
        except MatchError:
            return None
        if self.tensor_cores and target.kind.name == "cuda":
            wgmma = gpu_gemm_wgmma.ENABLED if self.wgmma is None else self.wgmma
            if wgmma and self.mma and self.mma_tile is None:
                try:  # wgmma on sm_90a (schedules/gpu_gemm_wgmma.py, gpu_gemm_wgmma_ws.py)
                    profile = fit_to_target(self.profile, target)
                    if self.wgmma_w_in_registers:
                        return wreg_gemm_kernel(func, target, profile, self.wgmma_tile,
                                                self.wgmma_w_in_registers, self.wgmma_x_rows,
                                                self.wgmma_ablate, self.plan_lengths)
                    if self.wgmma_specialised:
                        return ws_gemm_kernel(func, target, profile, self.wgmma_tile,
                                              self.wgmma_specialised, self.wgmma_ablate,
                                              self.wgmma_w_buffers, self.wgmma_pair_stores,
                                              self.wgmma_x_rows, self.wgmma_staged_stores,
                                              self.plan_lengths, self.wgmma_cluster_sum,
                                              consumer_units=self.wgmma_consumer_units)
                    return wgmma_gemm_kernel(func, target, profile, self.wgmma_tile,
                                             self.wgmma_x_stages)
                except MatchError:
                    pass
            if self.wgmma is None and self.mma and self.mma_tile is None:
                # a deep or wide GEMM (down, gate/up) on sm_90a: W in registers where on, else
                # the warp-specialised kernel; a mid one (q+k+v, o): that kernel summed in
                # clusters at the lengths where it fills the SMs, mma.sync elsewhere
                for kernel in (wreg_default_kernel, deep_gemm_kernel, mid_gemm_kernel):
                    try:
                        return kernel(func, target, fit_to_target(self.profile, target),
                                      self.plan_lengths)
                    except MatchError:
                        pass
            try:  # mma.sync with the dequant in the staging (schedules/gpu_gemm_mma.py)
                if self.mma:
                    return mma_gemm_kernel(func, target, fit_to_target(self.profile, target),
                                           tile=self.mma_tile, split_k=self.split_k,
                                           x_async=self.x_async, lengths=self.plan_lengths)
            except MatchError:
                pass
            sch = dl.gpu.matmul.MatmulTensorization().apply(func, target, tunable)
            if sch is not None:
                return sch
        sch = s_tir.Schedule(func)
        try:
            return self._schedule(sch, *match_matmul(sch, decode=False), target)
        except MatchError:  # a tiling the schedule cannot express: the next rule takes it
            return None

    def tiles(self, n: int, k: int, target) -> dict:
        p = fit_to_target(self.profile, target)
        tm, tn, mm, mn = p.gemm_threads_m, p.gemm_threads_n, p.gemm_micro_m, p.gemm_micro_n
        while tm * tn > p.max_threads:
            tm //= 2
        mn = _divisor(n // tn, mn) if n % tn == 0 else 1
        if n % tn:
            tn = _divisor(n, tn)
        tk = _divisor(k, p.gemm_tile_k)
        shared = (tm * mm * tk + tk * tn * mn) * 2
        while shared > p.local_memory_bytes and tk > 1:
            tk //= 2
            shared = (tm * mm * tk + tk * tn * mn) * 2
        return {"tm": tm, "tn": tn, "mm": mm, "mn": mn, "tk": tk}

    def _schedule(self, sch, main, dequant, producers, epilogues, _n_extent, n, k, target):
        t = self.tiles(n, k, target)
        tm, tn, mm, mn, tk = t["tm"], t["tn"], t["mm"], t["mn"], t["tk"]
        for blk in producers:
            sch.compute_inline(blk)
        n_lead = len(sch.get_loops(main)) - 3  # batch dims in front of [M, N, K]
        sch.pad_einsum(main, [1] * n_lead + [tm * mm, 1, 1])
        *lead, m_loop, n_loop, k_loop = sch.get_loops(main)
        bm, vm, ty, mi = sch.split(m_loop, [None, 1, tm, mm])
        bn, vx, tx = sch.split(n_loop, [None, mn, tn])  # a thread's columns are tn apart
        ko, ki = sch.split(k_loop, [None, tk])
        sch.reorder(*lead, bm, bn, vm, vx, ty, tx, ko, ki, mi)
        by = sch.fuse(*lead, bm) if lead else bm
        sch.bind(by, "blockIdx.y")
        sch.bind(bn, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.bind(vx, "vthread.x")  # mn virtual threads: a compact register tile per column
        sch.unroll(mi)

        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, tx, preserve_unit_loops=True)

        def fetch(index, vec):
            block = sch.cache_read(main, index, "shared")
            sch.compute_at(block, ko, preserve_unit_loops=True)
            loops = sch.get_loops(block)[-2:]
            fused = sch.fuse(*loops)
            _, fty, ftx, v = sch.split(fused, [None, tm, tn, vec])
            sch.bind(fty, "threadIdx.y")
            sch.bind(ftx, "threadIdx.x")
            sch.vectorize(v)
            return block

        # after pad_einsum the block reads the (padded) activation and the [K, N] weight
        reads = sch.get(main).reads
        if len(reads) != 2:
            raise MatchError(f"expected an activation and a weight, the matmul reads {len(reads)}")
        k_var = [iv.var for iv in sch.get(main).iter_vars if iv.iter_type == tirx.IterVar.CommReduce][0]
        x_idx = 0 if reads[0].region[-1].min.same_as(k_var) else 1  # X[..., k]; W[k, n]
        w_idx = 1 - x_idx
        # lanes per load: the profile's vector bytes over the element size (8 fp16, 4 fp32 on CUDA;
        # wider fp32 loads make TVM's CUDA codegen emit an invalid 8-float make_ulonglong4)
        size_x = tvm.DataType(str(reads[x_idx].source.dtype)).bits // 8
        size_w = tvm.DataType(str(reads[w_idx].source.dtype)).bits // 8
        vec_x = _divisor(tk, max(1, self.profile.vector_bytes // size_x))
        vec_w = _divisor(tn * mn, max(1, self.profile.vector_bytes // size_w))
        if dequant is not None:  # TVM's CUDA codegen mis-emits 8-lane ushort ops (make_uint4)
            vec_w = min(vec_w, 4)
        while (tm * mm * tk) % (tm * tn * vec_x):
            vec_x //= 2
            if vec_x == 0:
                raise MatchError("X tile does not divide over the workgroup")
        while (tk * tn * mn) % (tm * tn * vec_w):
            vec_w //= 2
            if vec_w == 0:
                raise MatchError("W tile does not divide over the workgroup")
        x_s = fetch(x_idx, vec_x)
        w_s = fetch(w_idx, vec_w)
        # the padded X copy (zeros past n) and the dequantize block: computed in the tile loads
        for blk in sch.get_producers(x_s):
            sch.compute_inline(blk)
        if dequant is not None:
            sch.compute_inline(dequant)
        for blk in sch.get_producers(w_s):
            try:  # (a producer that cannot be inlined stays a loop nest of its own)
                sch.compute_inline(blk)
            except s_tir.ScheduleError:
                pass
        # the padded output and the epilogue (a chain such as SiLU's sigmoid then multiply):
        # written from the register tile, rows < n only
        auto_inline_consumer_chain(sch, acc)
        sch.decompose_reduction(main, ko)
        check_all_bound(sch)
        return sch


def simt_only(profile: GPUProfile) -> GPUPrefillGEMM:
    """The SIMT schedule even where the profile would take tensor cores (benchmarks, tests)."""
    return GPUPrefillGEMM(replace(profile, gemm_tensor_cores=False))


__all__ = ["GPUPrefillGEMM", "simt_only"]
