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
* decode GEMV over panel-major codes (a CPU build's, ``relax_passes/pack_weight_panels.py``), the
  kernel taking the scales out of each group (``tvm_lite.quant.kernels.scales_per_group``): per
  task one panel of columns; per group, the partial sums ``x . (code - zero)`` in registers (the
  4 codes of a word unrolled: shift, AND/OR, widen, subtract, FMA: 5 vector ops per 16 weights
  where the per-weight dequant takes 9), then one FMA with the group's scales. Each thread reads
  its panels' codes, scales and zeros front to back.

"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

from tvm_lite.quant.kernels import GROUP_BLOCK

from .cpu_gemm import (TILE_SCOPE, _accumulate_in_registers, _extent, _vectorize_tail,
                       match_weight_matmul, panel_width, schedule_gemm, schedule_gemv)
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


def _inline_producers(sch, infos, keep: set) -> None:
    """Inline the injective blocks other than ``keep`` and the matmul's epilogue (e.g. a fused
    AWQ input scale); one that cannot be inlined stays a loop nest of its own."""
    main = next((b.block_rv for b in infos if sch.get(b.block_rv).name_hint == "matmul"), None)
    epilogues = {sch.get(b).name_hint for b in sch.get_consumers(main)} if main is not None else set()
    for info in infos:
        name = sch.get(info.block_rv).name_hint
        if name not in keep and name not in epilogues and info.is_injective():
            try:
                sch.compute_inline(info.block_rv)
            except s_tir.ScheduleError:
                pass


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


def schedule_grouped_gemv(sch, group, main, epilogue, tiles, panel: int,
                          codes_per_word: int = 4) -> bool:
    """``main``: ``Y[j] += partial[g, j] * s[g, j]``; ``group``: ``partial[g, j] = sum_kk
    x[g G + kk] (code - zero)`` (the kernel of ``kernels._grouped_matmul``, unit rows dropped by
    normalization). One task per panel, the group's partial sums in registers."""
    lanes = tiles.lanes
    *lead, j, g = sch.get_loops(main)
    n = _extent(sch, j)
    if not n or n % panel or panel % lanes:
        return False
    jo, ji = sch.split(j, [None, panel])
    sch.reorder(jo, *lead, g, ji)
    jv, jl = sch.split(ji, [None, lanes])
    sch.parallel(jo)
    sch.unroll(jv)
    sch.vectorize(jl)
    sch.set_scope(group, 0, TILE_SCOPE)
    sch.compute_at(group, g)
    *_, gj, kk = sch.get_loops(group)
    size = _extent(sch, kk)
    if not size or size % codes_per_word:
        return False
    ko, ki = sch.split(kk, [None, codes_per_word])
    sch.reorder(ko, ki, gj)
    gv, gl = sch.split(gj, [None, lanes])
    sch.unroll(ki)
    sch.unroll(gv)
    sch.vectorize(gl)
    sch.decompose_reduction(group, ko)
    store = _accumulate_in_registers(sch, main, epilogue, jo)
    _vectorize_tail(sch, store, lanes)
    sch.decompose_reduction(main, g)
    return True


def _grouped(sch, infos):
    """``(group, main, epilogue)`` of a scales-per-group GEMV, else None."""
    names = {sch.get(b.block_rv).name_hint: b for b in infos}
    if GROUP_BLOCK not in names or "matmul" not in names:
        return None
    main = names["matmul"].block_rv
    rest = [b for b in infos if sch.get(b.block_rv).name_hint not in (GROUP_BLOCK, "matmul")]
    if len(rest) > 1 or (rest and not rest[0].is_injective()):
        return None
    return names[GROUP_BLOCK].block_rv, main, rest[0].block_rv if rest else None


class CPUDequantMatmul(dl.ScheduleRule):
    """``Y[..., n] = sum_k X[..., k] * dequantize(W)[k, n]`` (+ an elementwise epilogue)."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("llvm", "c"):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        blocks = {sch.get(b.block_rv).name_hint for b in infos or []}
        if GROUP_BLOCK in blocks:
            return self._grouped(sch, infos, target)
        if DEQUANT_BLOCK not in blocks:
            return None  # not a dequant-fused matmul
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1:
            return None
        main = reductions[0].block_rv
        _inline_producers(sch, infos, {DEQUANT_BLOCK, sch.get(main).name_hint})
        infos = [i for i in normalize_prim_func(sch) or []
                 if sch.get(i.block_rv).name_hint != DEQUANT_BLOCK]
        matched = match_weight_matmul(sch, infos)
        if matched is None:
            return None
        main, epilogue, rows = matched
        tiles = cpu_tiles(target)
        panel = panel_width(sch, sch.get_sblock(DEQUANT_BLOCK))  # panel-major codes, or None
        widen_dequant(sch, sch.get_sblock(DEQUANT_BLOCK))
        schedule = schedule_gemv if rows == 1 else schedule_gemm
        try:
            done = schedule(sch, main, epilogue, tiles, dequant=sch.get_sblock(DEQUANT_BLOCK),
                            panel=panel)
        except s_tir.ScheduleError:  # a shape the tiles do not fit
            return None
        return sch if done else None

    @staticmethod
    def _grouped(sch, infos, target):
        _inline_producers(sch, infos, {GROUP_BLOCK, "matmul"})
        found = _grouped(sch, normalize_prim_func(sch) or [])
        if found is None:
            return None
        group, main, epilogue = found
        panel = panel_width(sch, group)
        if panel is None:
            return None
        try:
            done = schedule_grouped_gemv(sch, group, main, epilogue, cpu_tiles(target), panel)
        except s_tir.ScheduleError:
            return None
        return sch if done else None


__all__ = ["CPUDequantMatmul", "schedule_grouped_gemv", "widen_dequant"]
