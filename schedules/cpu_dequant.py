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
        if len(reductions) != 1 or not reductions[0].dom_kind().endswith("SR"):
            return None
        main = reductions[0].block_rv
        # producers other than the dequant (e.g. a fused input scale) are inlined
        for info in infos:
            name = sch.get(info.block_rv).name_hint
            if info.block_rv != main and name != DEQUANT_BLOCK and info.is_injective():
                if sch.get_consumers(info.block_rv) and main in sch.get_consumers(info.block_rv):
                    try:
                        sch.compute_inline(info.block_rv)
                    except Exception:  # pylint: disable=broad-except
                        return None
        epilogues = sch.get_consumers(main)
        *outer, n, k = sch.get_loops(main)
        jo, ji = sch.split(n, [None, VECTOR_LANES])
        sch.reorder(jo, *outer, k, ji)
        sch.parallel(jo)
        sch.vectorize(ji)
        sch.decompose_reduction(main, k)
        sch.compute_at(dequant, jo)
        dk, dn = sch.get_loops(dequant)[-2:]
        dko, dki = sch.split(dk, [None, 4])
        sch.reorder(dko, dki, dn)
        sch.unroll(dki)
        sch.vectorize(dn)
        for epilogue in epilogues:
            try:
                sch.reverse_compute_at(epilogue, jo)
            except Exception:  # pylint: disable=broad-except
                pass
        return sch
