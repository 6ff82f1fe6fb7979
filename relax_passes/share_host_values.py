"""ShareHostValues: each host-side value a step makes, made once per call rather than per use.

After ``PlanSymbolicArena`` and ``InlineStepCalls`` a decode step is one flat function, and each
kernel call brings host work of its own, one VM call apiece:

* an ``R.memory.view`` of a workspace buffer per planned tensor (``runtime.TVMTensorCreateView``),
  although the plan reuses a handful of (buffer, shape, dtype) triples everywhere: SmolLM2's
  decode step made 403 views, 83 of them distinct;
* a ``vm.builtin.make_shape`` per symbolic shape argument (the cache views' ``(past_len + 1, 3,
  64)``, two per layer) and a ``vm.builtin.make_prim_value`` per symbolic scalar argument
  (``past_len`` for each layer's ``kv_append``);
* a ``vm.builtin.make_tuple`` per multi-output kernel (``add_rms_norm``, ``kv_append``): the tuple
  ``CallTIRRewrite`` leaves, whose fields the later bindings read.

In each function that allocates no storage (the arena-planned decoders and steps), this pass binds
every symbolic ``R.shape`` argument (of a view or a function call) and every symbolic scalar
argument of a call to a variable at its first use and passes that variable afterwards, replaces a
view by the earlier identical one (same buffer variable, shape and dtype: the same bytes, so the
kernels see the same memory), reads a field of a tuple made in the function directly and drops
the tuples nothing reads any more. Kernel calls are left as they are. Only a function's top-level
bindings are shared; a function with ``If`` branches is left alone. Runs after
``DropKillsWithoutStorage`` (so no kill can release a value shared past it, and
``KillAfterLastUse``'s canonicalization, which would fold a variable bound to a bare scalar back
into its uses, is behind it) and before ``VMShapeLower``, which then makes each shared value once.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, tirx

from .drop_kills_without_storage import allocates_storage

VIEW = "relax.memory.view"


def _symbolic(expr, bound) -> bool:
    """A shape with a symbolic dim, or a symbolic scalar (not a constant, not a Relax var)."""
    if isinstance(expr, relax.ShapeExpr):
        return not all(isinstance(v, tirx.IntImm) for v in expr.values)
    return tvm.ir.is_prim_expr(expr) and not isinstance(expr, (tirx.IntImm, tirx.FloatImm)) \
        and expr not in bound


def _is_view(expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == VIEW


def _has_branches(func: relax.Function) -> bool:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(isinstance(e, relax.If)))
    return any(found)


class _Table:
    """Expressions by structure (variables by identity) -> the variable bound to the first."""

    def __init__(self):
        self.entries: dict = {}

    def get(self, expr):
        for seen, var in self.entries.get(tvm_ffi.structural_hash(expr), ()):
            if tvm_ffi.structural_equal(seen, expr):
                return var
        return None

    def add(self, expr, var) -> None:
        self.entries.setdefault(tvm_ffi.structural_hash(expr), []).append((expr, var))


@relax.expr_functor.mutator
class _Share(relax.PyExprMutator):
    def __init__(self, mod, func: relax.Function):
        super().__init__(mod)
        self.table = _Table()
        self.tuples: dict = {}  # var -> the tuple literal bound to it
        self.bound = set(func.params) | {b.var for block in func.body.blocks
                                         for b in block.bindings}

    def _arg(self, arg):
        if not _symbolic(arg, self.bound):
            return arg
        var = self.table.get(arg)
        if var is None:
            var = relax.Var("host_value", arg.ty)
            self.builder_.emit_normalized(relax.VarBinding(var, arg))
            self.table.add(arg, var)
        return var

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (_is_view(call) or isinstance(call.op, relax.GlobalVar)):
            return call  # (operators that need literal shapes keep them)
        args = [self._arg(a) for a in call.args]
        return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        if _is_view(value):
            earlier = self.table.get(value)
            if earlier is not None:
                self.set_var_remap(binding.var, earlier)
                return
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.tuples:
            # a field of a tuple made here: the field itself (the tuple is then dropped)
            self.set_var_remap(binding.var, self.tuples[value.tuple_value].fields[value.index])
            return
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
        if _is_view(value):
            self.table.add(value, binding.var)
        elif isinstance(value, relax.Tuple):
            self.tuples[binding.var] = value


def _drop_unused_tuples(func: relax.Function) -> relax.Function:
    used = set()

    def record(expr):
        if isinstance(expr, relax.Var):
            used.add(expr)

    for block in func.body.blocks:
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, record)
    relax.analysis.post_order_visit(func.body.body, record)
    blocks = [relax.BindingBlock([b for b in block.bindings
                                  if not (isinstance(b.value, relax.Tuple) and b.var not in used)],
                                 block.span)
              for block in func.body.blocks]
    body = relax.SeqExpr(blocks, func.body.body, func.body.span)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


@tvm.transform.module_pass(opt_level=0, name="ShareHostValues")
class ShareHostValues:
    """Share views, symbolic shapes and scalars in the functions that allocate no storage; drop
    unread tuples (module doc)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        todo = [(gv, f) for gv, f in mod.functions_items()
                if isinstance(f, relax.Function) and not _has_branches(f)
                and not allocates_storage(f)]
        if not todo:
            return mod
        for gv, func in todo:
            share = _Share(mod, func)
            shared = share.visit_expr(func)
            mod = share.builder_.get()
            mod[gv] = _drop_unused_tuples(shared)
        return mod
