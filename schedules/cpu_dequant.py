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


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _exact_fp32(value):
    """``Cast(f32, (h - c) * s)`` with fp16 ``h, c, s`` -> the same number computed in fp32:
    ``Cast(f32, Cast(f16, (f32(h) - f32(c)) * f32(s)))``; None for any other expression.

    x86 without AVX512-FP16 (and NEON without ``+fullfp16``) has no fp16 arithmetic, so LLVM
    rounds every fp16 operation through fp32 and back: two conversions per operation and weight
    vector. ``h - c`` is exact in fp16 (both are integers in [1024, 2048): E0M4's ``1024 + q`` and
    the stored ``1024 + z``) and the fp32 product of two fp16 numbers is exact, so rounding that
    product to fp16 once gives the fp16 expression's result bit for bit; the group's ``c`` and
    ``s`` are converted once per load instead of per operation."""
    if not (isinstance(value, tirx.Cast) and _dtype(value) == "float32"):
        return None
    mul = value.value
    if not (isinstance(mul, tirx.Mul) and _dtype(mul) == "float16" and isinstance(mul.a, tirx.Sub)):
        return None
    sub = mul.a
    f32 = lambda e: tirx.Cast("float32", e)  # noqa: E731
    return f32(tirx.Cast("float16", (f32(sub.a) - f32(sub.b)) * f32(mul.b)))


def widen_dequant(sch, dequant) -> bool:
    """Rewrite the ``dequantize`` block's store with :func:`_exact_fp32` (in place, through the
    schedule's state); False if its expression has another form (e.g. int4's conversion)."""
    block = sch.get(dequant)
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        return False
    value = _exact_fp32(store.value)
    if value is None:
        return False
    new = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint,
                       tirx.BufferStore(store.buffer, value, store.indices), block.init,
                       block.alloc_buffers, block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(dequant), new, {block: new})
    return True


class CPUDequantMatmul(dl.ScheduleRule):
    """``Y[..., n] = sum_k X[..., k] * dequantize(W)[k, n]`` (+ an elementwise epilogue)."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("llvm", "c"):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or DEQUANT_BLOCK not in {sch.get(b.block_rv).name_hint for b in infos}:
            return None  # not a dequant-fused matmul
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1:
            return None
        main = reductions[0].block_rv
        keep = {DEQUANT_BLOCK, sch.get(main).name_hint}
        epilogues = {sch.get(b).name_hint for b in sch.get_consumers(main)}
        for info in infos:  # other producers (e.g. a fused AWQ input scale): inline
            name = sch.get(info.block_rv).name_hint
            if name not in keep and name not in epilogues and info.is_injective():
                try:  # (a producer that cannot be inlined stays a loop nest of its own)
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:
                    pass
        infos = [i for i in normalize_prim_func(sch) or []
                 if sch.get(i.block_rv).name_hint != DEQUANT_BLOCK]
        matched = match_weight_matmul(sch, infos)
        if matched is None:
            return None
        main, epilogue, rows = matched
        tiles = cpu_tiles(target)
        widen_dequant(sch, sch.get_sblock(DEQUANT_BLOCK))
        schedule = schedule_gemv if rows == 1 else schedule_gemm
        try:
            done = schedule(sch, main, epilogue, tiles, dequant=sch.get_sblock(DEQUANT_BLOCK))
        except s_tir.ScheduleError:  # a shape the tiles do not fit
            return None
        return sch if done else None


__all__ = ["CPUDequantMatmul", "widen_dequant"]
