"""RemoveNoOpOps: drop casts, reshapes, broadcasts and concats that do not change their input.

Torch exports are full of ``Cast(x, to=float)`` on float tensors and ``Expand``/``Reshape`` to
the shape the tensor already has (``_to_copy``, ``expand_as``...), and TorchScript exports
concatenate a single tensor (``cat([past])``) and, in fp16, cast the attention probabilities to
fp32 and straight back (``softmax(..., dtype=float32).to(fp16)`` on an fp16 softmax): a cast
there and back through a wider type is dropped too. After host shape computing
those shapes are symbolic expressions the analyzer can compare, so the ops are provably no-ops.
"""

from __future__ import annotations

import tvm
from tvm import relax


# (from, to) casts that keep every value: a cast back to ``from`` after one of them is exact
_WIDENING = {("float16", "float32"), ("float16", "float64"), ("bfloat16", "float32"),
             ("bfloat16", "float64"), ("float32", "float64")}


@relax.expr_functor.mutator
class _Remover(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.analyzer = tvm.sym.Analyzer()
        self.removed = 0

    def _same_shape(self, ty, shape) -> bool:
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return False
        if not isinstance(ty.shape, relax.ShapeExpr) or not isinstance(shape, relax.ShapeExpr):
            return False
        a, b = ty.shape.values, shape.values
        return len(a) == len(b) and all(self.analyzer.can_prove_equal(x, y) for x, y in zip(a, b))

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or not call.args:
            return call
        name, arg = call.op.name, call.args[0]
        noop = (
            (name == "relax.astype" and isinstance(arg.ty, relax.TensorType)
             and arg.ty.dtype == call.attrs.dtype)
            or (name in ("relax.reshape", "relax.broadcast_to")
                and self._same_shape(arg.ty, call.args[1]))
        )
        if name == "relax.astype" and isinstance(arg, relax.Var):  # a cast there and back
            inner = self.lookup_binding(arg)
            if isinstance(inner, relax.Call) and isinstance(inner.op, tvm.ir.Op) \
                    and inner.op.name == "relax.astype" \
                    and isinstance(inner.args[0].ty, relax.TensorType) \
                    and (str(inner.args[0].ty.dtype), str(inner.attrs.dtype)) in _WIDENING \
                    and str(inner.args[0].ty.dtype) == str(call.attrs.dtype):
                noop, arg = True, inner.args[0]
        if name == "relax.concat" and isinstance(arg, relax.Tuple) and len(arg.fields) == 1:
            noop, arg = True, arg.fields[0]  # concat of one tensor (TorchScript's cat([past]))
        if noop:
            self.removed += 1
            return arg
        return call


@tvm.transform.module_pass(opt_level=0, name="RemoveNoOpOps")
class RemoveNoOpOps:
    """Drop casts to the same dtype, reshapes/broadcasts to the same (symbolic) shape and
    one-tensor concats."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        remover = _Remover(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                remover.builder_.update_func(gv, remover.visit_expr(func))
        return remover.builder_.get()
