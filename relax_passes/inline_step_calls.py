"""InlineStepCalls: a greedy step entry (``prefill_step``, ``prefill_chain_flat``,
``decode_step``, ``decode_chain``, ``decode_padded``, their ``_flat`` variants) as one flat
function.

``AddStepEntries`` builds ``decode_step`` as calls: the step helpers, ``decode_tupled`` (which
unpacks the weight tuple) and, inside it, ``decode``. Each Relax function checks its parameters
when it is called (``VMShapeLower``: one ``check_tensor_info`` and one ``match_shape`` per tensor,
plus a ``tuple_getitem`` per tuple field), so every weight was checked and unpacked at each of the
three levels of every step: SmolLM2's decode step made ~7,450 VM calls for 389 kernels.

This pass inlines the tuple wrapper and the decoder into the step entries, so the weights, caches
and workspaces are checked once, where they enter (the small step helpers stay calls). The
callees stay in the module as they are (``decode`` and ``decode_tupled`` are entries too: the
engine and the RPC runner call them).

``_Inline`` binds the callee's symbolic vars to the caller's values first (TVM's own
``InlinePrivateFunctions`` binds the parameters but not the symbolic vars an ``R.Shape`` argument
gives, and fails on the greedy helper's ``if_then_else`` shapes). Runs right after
``AddStepEntries``, before ``LowerAllocTensor`` and ``VMShapeLower``; a no-op where there are no
step entries.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..convention import (DECODE, DECODE_CHAIN, DECODE_PADDED, DECODERS, PREFILL, PREFILL_CHAIN,
                          flat, step, step_decoder, tupled)


def _decoder_callees(mod: tvm.IRModule, names: dict, decoder: str, fill: bool = False) -> set:
    """The GlobalVars to inline into ``decoder``'s step (``fill``: ``prefill_chain``): its tuple
    wrapper and the Relax functions that calls (the decoder itself). The step helpers (ids,
    mask, greedy token) take a few small arguments and stay calls."""
    wrapper = tupled(step_decoder(decoder, names, fill))
    if wrapper not in names:
        return set()
    found = {names[wrapper]}

    def record(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar) \
                and isinstance(mod[expr.op], relax.Function):
            found.add(expr.op)

    relax.analysis.post_order_visit(mod[names[wrapper]].body, record)
    return found


def _match(param_ty, arg_ty, out: dict) -> None:
    """Record in ``out`` the symbolic vars of a parameter's type that the argument's type gives
    other values (e.g. ``past_len: R.Shape([past_seq])`` called with ``R.Shape([p])``)."""
    if isinstance(param_ty, relax.TupleType) and isinstance(arg_ty, relax.TupleType):
        for f, g in zip(param_ty.fields, arg_ty.fields):
            _match(f, g, out)
        return
    if isinstance(param_ty, relax.TensorType) and isinstance(arg_ty, relax.TensorType):
        dims = [getattr(t.shape, "values", None) for t in (param_ty, arg_ty)]
    elif isinstance(param_ty, relax.ShapeType) and isinstance(arg_ty, relax.ShapeType):
        dims = [param_ty.values, arg_ty.values]
    else:
        return
    if dims[0] is not None and dims[1] is not None:
        for v, e in zip(*dims):
            if isinstance(v, tirx.Var) and not v.same_as(e):
                out[v] = e


@relax.expr_functor.mutator
class _Inline(relax.PyExprMutator):
    """Replaces each call of a function in ``callees`` by that function's body, recursively: its
    symbolic vars bound to the caller's values (from the arguments' types) and its parameters
    to the arguments."""

    def __init__(self, mod: tvm.IRModule, callees: set):
        super().__init__(mod)
        self.mod, self.callees = mod, callees

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, relax.GlobalVar) and call.op in self.callees):
            return call
        smap: dict = {}
        callee = self.mod[call.op]
        for param, arg in zip(callee.params, call.args):
            _match(param.ty, arg.ty, smap)
        if smap:
            callee = callee.bind_symbolic_vars(smap)
        for param, arg in zip(callee.params, call.args):
            self.set_var_remap(param, arg if isinstance(arg, relax.Var)
                               else self.builder_.emit(arg))
        for block in callee.body.blocks:
            for binding in block.bindings:
                self.visit_binding(binding)
        return self.visit_expr(callee.body.body)


@tvm.transform.module_pass(opt_level=0, name="InlineStepCalls")
class InlineStepCalls:
    """Inline the tuple wrapper and the decoder into the step entries (see the module doc)."""

    def __init__(self, decoders=DECODERS):
        self.decoders = tuple(decoders)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = {gv.name_hint: gv for gv in mod.get_global_vars()}
        out = mod
        for decoder in self.decoders:
            entries = [step(decoder)] + ([DECODE_CHAIN, DECODE_PADDED] if decoder == DECODE else
                                         [PREFILL_CHAIN] if decoder == PREFILL else [])
            for name in [*entries, *map(flat, entries)]:
                callees = _decoder_callees(mod, names, decoder,
                                           fill=name.startswith(PREFILL_CHAIN))
                if name not in names or not callees:
                    continue
                inline = _Inline(out, callees)
                entry = names[name]
                inline.builder_.update_func(entry, inline.visit_expr(out[entry]))
                out = inline.builder_.get()
        return out
