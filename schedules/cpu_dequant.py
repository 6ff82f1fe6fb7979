"""CPU (LLVM) rule for tvm_lite's dequant-fused matmuls (``tvm_lite.quant.kernels``).

The kernels have a ``dequantize`` block (4-bit codes -> fp16 -> the matmul's dtype) feeding a
``matmul`` reduction. Per tile of 16 output columns (one parallel task), the rule dequantizes the
tile's ``[K, 16]`` weights once into a local buffer -- the 4 codes of a packed word unrolled, so
the shifts are constants -- and then runs every row of ``x`` against it, vectorized over the 16
columns. Rows of a prefill reuse the dequantized tile instead of decoding it again per row.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

VECTOR_LANES = 16
CODES_PER_WORD = 4  # the 4 codes of a packed uint16 (tvm_lite.quant.format)
DEQUANT_BLOCK = "dequantize"


class CPUDequantMatmul(dl.ScheduleRule):
    """``Y[..., n] = sum_k X[..., k] * dequantize(W)[k, n]`` (+ an elementwise epilogue)."""

    def __init__(self, tile_first: bool = False):
        self.tile_first = tile_first

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("llvm", "c"):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or DEQUANT_BLOCK not in {sch.get(b.block_rv).name_hint for b in infos}:
            return None  # not a dequant-fused matmul
        dequant = sch.get_sblock(DEQUANT_BLOCK)
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or not reductions[0].dom_kind().endswith("SR"):
            return None
        main = reductions[0].block_rv
        epilogues = sch.get_consumers(main)
        for info in infos:  # other producers (e.g. a fused AWQ input scale): inline
            if sch.get(info.block_rv).name_hint not in (DEQUANT_BLOCK, sch.get(main).name_hint) \
                    and info.is_injective() and not any(sch.get(e).same_as(sch.get(info.block_rv))
                                                        for e in epilogues):
                try:  # (a producer that cannot be inlined stays a loop nest of its own)
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:
                    pass
        *outer, n, k = sch.get_loops(main)
        jo, ji = sch.split(n, [None, VECTOR_LANES])
        if self.tile_first:  # dequantize a [K, 16] tile, then every row against it
            sch.reorder(jo, *outer, k, ji)
            sch.parallel(jo)
            sch.vectorize(ji)
            sch.decompose_reduction(main, k)
            sch.compute_at(dequant, jo)
            dk, dn = sch.get_loops(dequant)[-2:]
            dko, dki = sch.split(dk, [None, CODES_PER_WORD])
            sch.reorder(dko, dki, dn)
            sch.unroll(dki)
            sch.vectorize(dn)
        else:  # per k: dequantize 16 weights into registers, then every row
            ko, ki = sch.split(k, [None, CODES_PER_WORD])
            sch.reorder(jo, ko, ki, *outer, ji)
            sch.parallel(jo)
            sch.vectorize(ji)
            sch.decompose_reduction(main, ko)
            sch.compute_at(dequant, ki)
            sch.vectorize(sch.get_loops(dequant)[-1])
            sch.unroll(ki)
        for epilogue in epilogues:
            try:  # (an epilogue that cannot move under the tile runs after the matmul)
                sch.reverse_compute_at(epilogue, jo)
            except s_tir.ScheduleError:
                pass
        return sch
