"""FuseGEMVPrologue: a decode GEMV computes its input's producer -- an activation or an RMSNorm.

After FuseOps a decode step's layer still launches the producers of two GEMVs as kernels of their
own, each a round trip of one row through memory::

    a = call_tir(fused_..._silu_mul, (gate_up,))          # act(gate) * up (FuseSiluMul)
    y = call_tir(matmul3, (a, W_down))                    # the down projection
    h = call_tir(rms_norm, (s, w))                        # the next layer's input norm
    y = call_tir(matmul, (h, W_qkv))

This pass (run after FuseOps/FuseTIR) groups each such pair into one function and FuseTIR makes it
one PrimFunc: the producer's blocks then the matmul's. It repeats until nothing more joins, so a
chain of producers becomes one prologue (Gemma's fp16 norm, then the cast of its fp32 output).
The GPU GEMV rule (``schedules/gpu_gemv.py``) computes the producer per group of ``K`` in registers where the
matmul reads it, and a norm's row statistic (the ``sum_sq`` block of ``rms_norm``, see
``relax_passes/fuse_add_rms_norm.py``) is reduced by every workgroup's threads first: the row is
``hidden_size`` values, a few loads per thread. The residual add in front of a norm stays the
previous GEMV's epilogue (``FuseAddRMSNorm(norm_before_gemv=...)`` leaves it there).

A pair is grouped when

* the consumer is a decode GEMV: one reduction block, its output ``(1, .., 1, N)`` (static);
* the producer is elementwise/injective (every block spatial) or tvm_lite's ``rms_norm``
  (spatial blocks + the ``sum_sq`` row reduction), with one output read only by the GEMV, as its
  first argument.

GPU only (the pipeline's switch): the CPU rules schedule a GEMV with its input in memory. The
packed half2 4-bit GEMV of CUDA (``schedules/gpu_gemv_half2.py``) takes the prologue too: its
workgroup computes the row (and the norm's statistic) into shared memory first.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax import dpl
from tvm.relax.transform import FusionPattern

from ..convention import NORM_ROW_STAT_BLOCK

PATTERN = "tvm_lite.gemv_prologue"
CALL_TIR = "relax.call_tir"
MAX_ARGS = 8  # a GEMV's arguments: x, the weight (or codes, scale, zero), epilogue operands


def _blocks(func: tirx.PrimFunc) -> list:
    """The blocks under the root of a loop-nest PrimFunc ([] if it has no root block)."""
    try:
        sch = s_tir.Schedule(func)
        return [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    except (tvm.TVMError, ValueError):
        return []


def _reduces(block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)


def _plain(func) -> bool:
    """A loop-nest PrimFunc (not one of tvm_lite's hand-scheduled kernels)."""
    return isinstance(func, tirx.PrimFunc) and (func.attrs is None or (
        "tvm_lite.kernel" not in func.attrs and not func.attrs.get("tirx.is_scheduled", 0)))


def is_decode_gemv(func, out_ty) -> bool:
    """One reduction block and a ``(1, .., 1, N)`` static output."""
    if not _plain(func) or not isinstance(out_ty, relax.TensorType) or out_ty.shape is None:
        return False
    dims = list(out_ty.shape.values)
    if len(dims) < 2 or not all(isinstance(d, tirx.IntImm) for d in dims) \
            or any(int(d) != 1 for d in dims[:-1]):
        return False
    return sum(_reduces(b) for b in _blocks(func)) == 1


def is_prologue(func) -> bool:
    """Every block spatial, or spatial blocks plus an rms_norm's row statistic."""
    if not _plain(func):
        return False
    blocks = _blocks(func)
    return bool(blocks) and all(not _reduces(b) or b.name_hint == NORM_ROW_STAT_BLOCK
                                for b in blocks) and len(func.params) >= 2


def _patterns() -> list:
    """``(consumer, producer)`` patterns: a call_tir whose first of ``n`` arguments is a call_tir,
    for each ``n`` up to MAX_ARGS (a tuple pattern has a fixed length)."""
    producer = dpl.is_op(CALL_TIR)(dpl.wildcard(), dpl.wildcard())
    return [(dpl.is_op(CALL_TIR)(dpl.wildcard(), dpl.is_tuple(
        [producer] + [dpl.wildcard() for _ in range(n - 1)])), producer)
        for n in range(MAX_ARGS, 0, -1)]


PATTERNS = _patterns()


@tvm.transform.module_pass(opt_level=0, name="FuseGEMVPrologue")
class FuseGEMVPrologue:
    """Decode GEMVs with their activation / RMSNorm producer -> one kernel each (see the module
    doc). ``self.count`` is the number of pairs fused by the last run."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def callee(call):
            gv = call.args[0]
            return mod[gv] if isinstance(gv, tvm.ir.GlobalVar) and gv in mod.get_global_vars() \
                else None

        def fits(ctx) -> bool:
            call = ctx.matched_expr
            prod = ctx.annotated_expr["producer"]
            var = ctx.value_to_bound_var.get(prod)
            if var is None or len(ctx.var_usages.get(var, [])) != 1:
                return False
            # (the producer's one output, not a tuple: one kernel feeds the GEMV)
            return isinstance(prod.ty, relax.TensorType) and is_prologue(callee(prod)) \
                and is_decode_gemv(callee(call), call.ty)

        patterns = [FusionPattern(PATTERN, pat, {"producer": prod}, fits)
                    for pat, prod in PATTERNS]
        start = _count_calls(mod)
        while True:  # a chain of producers (Gemma's fp16 norm, then its cast) joins one by one
            before = _count_calls(mod)
            mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False,
                                                   annotate_codegen=False)(mod)
            mod = relax.transform.FuseTIR()(mod)
            if _count_calls(mod) == before:
                break
        self.count = start - _count_calls(mod)
        return mod


def _count_calls(mod) -> int:
    n = 0

    def visit(e):
        nonlocal n
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == CALL_TIR:
            n += 1

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return n
