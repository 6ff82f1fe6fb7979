"""BindDequantKernelShapes: give each 4-bit matmul/take call a kernel built for its own shapes.

``QuantizeWeightMatmuls`` runs on the imported ``main``, so a dequant kernel's leading dims are
``main``'s (``[1, seq]``). ``SplitPrefillDecode`` then copies ``main`` into ``prefill`` (its own
``seq``) and ``decode`` (``seq`` bound to 1), but the shared kernel still says ``main``'s ``seq``.
FuseTIR checks that every Relax var of a fused group maps to structurally equal buffers in the
kernels that produce and consume it; a decode group ``dequant-matmul -> add`` then has the matmul
writing ``(1, seq, 576)`` and the legalized add reading ``(1, 1, 576)``: *"Inconsistent buffers
matmul and lv84 mapped to the same relax var"*. That was why quantized models could not use the
in-place KV cache (which is what splits prefill from decode).

This pass rebuilds each such kernel (``tvm_lite.quant.kernels.rebind_lead``) with the call
site's own leading dims -- ``(1, 1)`` in decode, prefill's ``seq`` in prefill -- exactly as
LegalizeOps builds the kernels of stock ops. Decode's matmuls become static ``M = 1`` GEMVs,
which is also what the decode schedule rules match on.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from tvm_lite.quant.kernels import MAKER_ATTR, rebind_lead

CALL_TIR = "relax.call_tir"


@relax.expr_functor.mutator
class _Binder(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod
        self.made: dict = {}  # (callee name, lead dims as text) -> GlobalVar
        self.rebound = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == CALL_TIR):
            return call
        gv = call.args[0]
        func = self.mod[gv] if gv in self.mod.get_global_vars() else None
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None \
                or MAKER_ATTR not in func.attrs:
            return call
        first = call.args[1].fields[0]
        ty = first.ty
        if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
            return call
        dims = list(ty.shape.values)
        kind = str(func.attrs[MAKER_ATTR]["kind"])
        lead = dims if kind == "take" else dims[:-1]  # a take's ids; a matmul's x[..., K]
        key = (gv.name_hint, tuple(str(d) for d in lead))
        if key not in self.made:
            new = rebind_lead(func, lead)
            if tvm_ffi.structural_equal(new.without_attr("global_symbol"), func):
                self.made[key] = gv
            else:
                name = str(new.attrs["global_symbol"])  # names the new lead dims (1x1x...)
                self.made[key] = self.builder_.add_func(new.without_attr("global_symbol"), name)
                self.rebound += 1
        new_gv = self.made[key]
        if new_gv.same_as(gv):
            return call
        return relax.Call(call.op, [new_gv, *call.args[1:]], call.attrs, call.ty_args, call.span)


@tvm.transform.module_pass(opt_level=0, name="BindDequantKernelShapes")
class BindDequantKernelShapes:
    """Rebuild tvm_lite's dequant kernels for the shapes of each call (see the module doc)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                   and MAKER_ATTR in f.attrs for _, f in mod.functions_items()):
            return mod
        binder = _Binder(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                binder.builder_.update_func(gv, binder.visit_expr(func))
        out = binder.builder_.get()
        return relax.transform.DeadCodeElimination()(out) if binder.rebound else out
