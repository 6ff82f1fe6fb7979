"""Shared machinery of tvm_lite's pattern fusion passes (``fuse_*.py``).

Each pass describes the subgraph it replaces with ``tvm.relax.dpl`` patterns and builds the
replacement kernel with TE for the call site's own shapes (the caller's symbolic vars, as
LegalizeOps does, so FuseTIR can still fuse the kernel with neighbours). :class:`BindingRewriter`
walks each function's bindings in order, tries the pass's matcher on every binding and emits
what the matcher returns; a matcher may also redirect later uses of an intermediate (the residual
sum of add + RMSNorm) to one of the fused kernel's outputs.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax import dpl

# TVM's op patterns (include/tvm/relax/op_attr_types.h), set on the generated kernels so FuseOps
# treats them like the stock ops they replace.
ELEMWISE, INJECTIVE, COMM_REDUCE, OUT_EWISE_FUSABLE, OPAQUE = 0, 2, 3, 4, 8


def maybe_cast(p: dpl.DFPattern) -> dpl.DFPattern:
    """``p`` or ``astype(p)``: exports of fp16 models widen to fp32 around norms and activations."""
    return dpl.is_op("relax.astype")(p) | p  # the cast first: ``p`` alone may be a wildcard


def scalar_value(expr) -> float | None:
    """The value of a scalar constant (any rank-0/size-1 constant), else None."""
    if isinstance(expr, tvm.ir.GenericConst):
        data = expr.value.numpy()
        if data.size == 1:
            return float(data.reshape(()))
    return None


def static_shape(expr) -> list | None:
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    return None


def static_ints(expr) -> list[int] | None:
    """A static tuple of ints (a Relax Tuple of PrimValues or a ShapeExpr), else None."""
    items = expr.fields if isinstance(expr, relax.Tuple) else getattr(expr, "values", None)
    if items is None:
        return None
    out = []
    for v in items:
        v = v if isinstance(v, tirx.IntImm) else getattr(v, "value", v)  # IntImm or PrimValue
        if not isinstance(v, tirx.IntImm):
            return None
        out.append(int(v.value))
    return out


def last_axis_slice(expr) -> tuple | None:
    """``(source, begin, end)`` if ``expr`` is ``strided_slice(source, axes=[-1], begin, end)``
    with unit stride over a source whose last dim is static (a view of a merged projection:
    ``relax_passes/merge_shared_input_projections.py``), else None."""
    if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == "relax.strided_slice"):
        return None
    src = expr.args[0]
    shape = static_shape(src)
    axes, begin, end = (static_ints(a) for a in expr.args[1:4])
    strides = static_ints(expr.args[4]) if len(expr.args) > 4 else [1]
    if shape is None or not isinstance(shape[-1], tirx.IntImm) or axes is None \
            or [a % len(shape) for a in axes] != [len(shape) - 1] or begin is None or end is None \
            or strides not in ([1], []):
        return None
    return src, begin[0], end[0]


def emit_like(builder, value, like: relax.Var, name: str | None = None) -> relax.Var:
    """Emit ``value`` as a dataflow var if ``like`` is one, else as a block output (a var the
    dataflow block exports, used after it, stays a non-dataflow Var)."""
    emit = builder.emit if isinstance(like, relax.DataflowVar) else builder.emit_output
    return emit(value, name or like.name)


def var_uses(func: relax.Function) -> dict:
    """Var -> number of uses in ``func`` (binding values and the function's result)."""
    count: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            count[e] = count.get(e, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, visit)
    relax.analysis.post_order_visit(func.body.body, visit)
    return count


def dtype_of(expr) -> str:
    return str(expr.ty.dtype)


def placeholder(expr, name: str):
    """A TE placeholder shaped like the Relax expression (its own symbolic vars)."""
    return te.placeholder(static_shape(expr), dtype_of(expr), name=name)


def prim_func(args, name: str, op_pattern: int) -> tirx.PrimFunc:
    func = te.create_prim_func(args).without_attr("global_symbol")
    return func.with_attrs({"op_pattern": op_pattern, "tvm_lite.fused": name})


@relax.expr_functor.mutator
class BindingRewriter(relax.PyExprMutator):
    """Calls ``match(rewriter, binding, var2val)`` on every VarBinding of every dataflow block.

    ``match`` returns None (keep the binding) or the new value of the binding's var; it may emit
    helper bindings through ``rewriter.builder_``, register remaps with
    ``rewriter.redirect(old_var, new_var)`` for uses that follow, and drop a later binding with
    ``rewriter.replace_later(var, new_var)``.
    """

    def __init__(self, mod, match):
        super().__init__(mod)
        self.match = match
        self.var2val: dict = {}
        self.kernels: dict = {}  # structural hash -> [(PrimFunc, GlobalVar)]
        self.count = 0
        self.analyzer = tvm.sym.Analyzer()
        self._val2var = None
        self._block, self._users = None, None
        self._replaced: dict = {}  # see replace_later

    def visit_dataflow_block_(self, block):
        self._block, self._users = block, None
        return super().visit_dataflow_block_(block)

    def users(self, var: relax.Var) -> list:
        """The vars of the current dataflow block's bindings that use ``var`` (a DataflowVar:
        nothing outside the block can use it), in the block as it was before this pass."""
        if self._block is None or not isinstance(var, relax.DataflowVar):
            return []
        if self._users is None:
            self._users = relax.analysis.udchain(self._block)
        return list(self._users.get(var, []))

    def add_kernel(self, func: tirx.PrimFunc, name: str) -> tvm.ir.GlobalVar:
        """The GlobalVar of ``func``, added once per structurally distinct kernel."""
        key = tvm_ffi.structural_hash(func)
        for f, gv in self.kernels.get(key, []):
            if tvm_ffi.structural_equal(f, func):
                return gv
        gv = self.builder_.add_func(func, name)
        self.kernels.setdefault(key, []).append((func, gv))
        return gv

    def analyzer_equal(self, a: list, b: list) -> bool:
        """Two shapes (lists of PrimExprs) provably equal."""
        return len(a) == len(b) and all(self.analyzer.can_prove_equal(x, y) for x, y in zip(a, b))

    def var_of(self, expr):
        """The Var bound to ``expr`` in the current function (pattern matches follow bindings,
        so they return values), or ``expr`` itself if it is a Var; None if unbound."""
        if isinstance(expr, relax.Var):
            return expr
        if self._val2var is None:
            self._val2var = {v: k for k, v in self.var2val.items()}
        return self._val2var.get(expr)

    def redirect(self, old: relax.Var, new: relax.Var) -> None:
        self.set_var_remap(old, new)

    def replace_later(self, var: relax.Var, new: relax.Var) -> None:
        """``var``'s binding, later in the block, is left out: its uses read ``new``."""
        self._replaced[var] = new

    def visit_var_binding_(self, binding):
        if binding.var in self._replaced:
            self.set_var_remap(binding.var, self._replaced.pop(binding.var))
            return
        value = binding.value
        if isinstance(value, relax.Call):
            new_value = self.match(self, binding, self.var2val)
            if new_value is not None:
                self.count += 1
                self.set_var_remap(binding.var, emit_like(self.builder_, new_value, binding.var))
                return
        super().visit_var_binding_(binding)


def run_on_functions(mod: tvm.IRModule, match) -> tuple[tvm.IRModule, int]:
    rw = BindingRewriter(mod, match)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.var2val, rw._val2var = relax.analysis.get_var2val(func), None
            rw.builder_.update_func(gv, rw.visit_expr(func))
    out = rw.builder_.get()
    if rw.count:
        out = relax.transform.DeadCodeElimination()(out)
    return out, rw.count
