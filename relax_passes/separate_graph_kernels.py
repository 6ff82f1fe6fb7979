"""SeparateGraphKernels: the kernels a CUDA graph replays get their own copies, named so.

Programmatic dependent launch (``relax_passes/launch_dependents_early.py``) made SmolLM2's decode
step 8% faster on an H200 when it is replayed as a CUDA graph (0.594 -> 0.544 ms), and its
prefill and its decode launched kernel by kernel 17-20% slower (eighteenth session). So, with
``BuildOptions(dependent_launch="graphs")``, only the kernels of the functions the engine
records as graphs (``decode_padded`` and its ``_flat`` variant) take it.

Those functions share their PrimFuncs with ``decode``, ``decode_step`` and the others. This pass
runs after ``InlineStepCalls`` (the graph functions are flat by then; the small step helpers
they call stay Relax functions). It finds the Relax functions reached only from the graph
functions, and each PrimFunc they call is given a copy named ``<name>`` + :data:`GRAPH_SUFFIX`
that only they call (a PrimFunc nothing else calls is moved, not copied). TVM names a PrimFunc's
kernels ``<name>_kernel``, ``<name>_kernel_1``...; the TIR pass picks the graph's kernels out by
that name after the host/device split (where no attribute of the PrimFunc survives). A module
without graph functions is left as it is.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..convention import DECODE_PADDED, flat
from .launch_dependents_early import GRAPH_SUFFIX

GRAPH_FUNCTIONS = (DECODE_PADDED, flat(DECODE_PADDED))


def _callees(func: relax.Function) -> set:
    """GlobalVars ``func`` calls (Relax functions and PrimFuncs)."""
    found = set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar):
            found.add(e.op)

    relax.analysis.post_order_visit(func.body, visit)
    return found


@relax.expr_functor.mutator
class _Redirect(relax.PyExprMutator):
    """Calls of the GlobalVars in ``mapping`` made calls of their copies."""

    def __init__(self, mod, mapping: dict):
        super().__init__(mod)
        self.mapping = mapping

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.GlobalVar) and call.op in self.mapping:
            return relax.Call(self.mapping[call.op], call.args, call.attrs, call.ty_args,
                              call.span)
        return call


@tvm.transform.module_pass(opt_level=0, name="SeparateGraphKernels")
class SeparateGraphKernels:
    """Every PrimFunc the graph functions call, as a copy named with :data:`GRAPH_SUFFIX` that
    only they call (module doc)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        funcs = {gv: f for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
        calls = {gv: _callees(f) for gv, f in funcs.items()}
        roots = [gv for gv in funcs if gv.name_hint in GRAPH_FUNCTIONS]
        if not roots:
            return mod

        def reached(start) -> set:
            seen, todo = set(), list(start)
            while todo:
                gv = todo.pop()
                if gv not in seen:
                    seen.add(gv)
                    todo += [c for c in calls.get(gv, ()) if c in funcs]
            return seen

        graph = reached(roots)
        others = reached([gv for gv in funcs if gv not in graph])
        graph_only = graph - others
        shared_prims = {c for gv in others for c in calls[gv] if c not in funcs}
        prims = sorted({c for gv in graph_only for c in calls[gv]
                        if isinstance(mod[c], tirx.PrimFunc)}, key=lambda gv: gv.name_hint)
        if not prims:
            return mod
        bb = relax.BlockBuilder(mod)
        mapping = {}
        for gv in prims:
            name = gv.name_hint + GRAPH_SUFFIX
            mapping[gv] = bb.add_func(mod[gv].with_attr("global_symbol", name), name)
        out = bb.get()
        for gv in graph_only:
            out[gv] = _Redirect(out, mapping).visit_expr(out[gv])
        for gv in prims:
            if gv not in shared_prims:
                del out[gv]
        return out


__all__ = ["SeparateGraphKernels", "GRAPH_FUNCTIONS"]
