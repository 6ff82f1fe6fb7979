"""CPU (LLVM) rule for tvm_lite's dequant-fused matmuls (``tvm_lite.quant.kernels``).

The kernels have a ``dequantize`` block (4-bit codes -> fp16 -> the matmul's dtype) feeding a
``matmul`` reduction. The rule schedules them like the fp32 weight matmuls
(:mod:`.cpu_gemm`), with the dequantized weights made in vector registers:

* decode GEMV (``M`` = 1): per task ``gemv_cols`` output columns, accumulated in registers; per
  packed word of codes the 4 codes are unrolled (constant shifts), each one dequantized for the
  task's columns (a shift, the AND/OR that makes the fp16 ``1024 + q``, a widening to fp32, the
  group's zero and scale) straight into the FMA -- the fp16 weight matrix never exists;
* prefill GEMM: each task dequantizes its ``[K, gemm_cols]`` weight panel once into the packed
  fp32 panel the fp32 GEMM micro-kernel reads, then runs every row tile against it.

"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .cpu_gemm import match_weight_matmul, schedule_gemm, schedule_gemv
from .cpu_target import cpu_tiles

DEQUANT_BLOCK = "dequantize"


class CPUDequantMatmul(dl.ScheduleRule):
    """``Y[..., n] = sum_k X[..., k] * dequantize(W)[k, n]`` (+ an elementwise epilogue)."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("llvm", "c"):
            return None
        sch = s_tir.Schedule(func)
        try:
            dequant = sch.get_sblock(DEQUANT_BLOCK)
        except Exception:  # pylint: disable=broad-except
            return None
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1:
            return None
        main = reductions[0].block_rv
        keep = {DEQUANT_BLOCK, sch.get(main).name_hint}
        epilogues = {sch.get(b).name_hint for b in sch.get_consumers(main)}
        for info in infos:  # other producers (e.g. a fused AWQ input scale): inline
            name = sch.get(info.block_rv).name_hint
            if name not in keep and name not in epilogues and info.is_injective():
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:  # pylint: disable=broad-except
                    pass
        infos = [i for i in normalize_prim_func(sch) or []
                 if sch.get(i.block_rv).name_hint != DEQUANT_BLOCK]
        matched = match_weight_matmul(sch, infos)
        if matched is None:
            return None
        main, epilogue, rows = matched
        tiles = cpu_tiles(target)
        schedule = schedule_gemv if rows == 1 else schedule_gemm
        try:
            done = schedule(sch, main, epilogue, tiles, dequant=sch.get_sblock(DEQUANT_BLOCK))
        except Exception:  # pylint: disable=broad-except  (a shape the tiles do not fit)
            return None
        return sch if done else None


__all__ = ["CPUDequantMatmul"]
