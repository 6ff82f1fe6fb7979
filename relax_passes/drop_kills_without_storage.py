"""DropKillsWithoutStorage: no register kills in a function that allocates no storage.

TVM's ``KillAfterLastUse`` (phase 4) releases every tensor and object a Relax function holds right
after its last use: one ``vm.builtin.null_value`` VM call each. That returns memory early where the
function owns it. A function planned into caller-owned workspaces (``PlanSymbolicArena``: the
``prefill``/``decode`` decoders and the step entries that inline them) owns none: its tensors are
views of the workspace and cache buffers, its parameters or its callees' small results, so a kill
frees nothing but a view's header, and SmolLM2's decode step made ~660 such calls per step (a
quarter of its VM calls), each costing host time while the GPU waits.

This pass removes the kills (``R.memory.kill_tensor``, ``R.memory.kill_storage``,
``R.vm.kill_object``) from every Relax function with no ``alloc_storage`` of its own; the registers
are released when the function returns, as its frame is. Functions that allocate (the step helpers,
a ``memory_plan="tvm"`` build, a past/present decoder) keep their kills. Runs right after
``KillAfterLastUse``, before ``LowerRuntimeBuiltin``.
"""

from __future__ import annotations

import tvm
from tvm import relax

KILLS = ("relax.memory.kill_tensor", "relax.memory.kill_storage", "relax.vm.kill_object")
ALLOCS = ("relax.memory.alloc_storage", "relax.vm.alloc_storage")


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def allocates_storage(func: relax.Function) -> bool:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(_op_name(e) in ALLOCS))
    return any(found)


@relax.expr_functor.mutator
class _DropKills(relax.PyExprMutator):
    def visit_var_binding_(self, binding):
        if _op_name(binding.value) not in KILLS:  # a kill is left out: nothing emitted
            super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="DropKillsWithoutStorage")
class DropKillsWithoutStorage:
    """Remove the register kills from the Relax functions that allocate no storage (module doc)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        todo = [(gv, f) for gv, f in mod.functions_items()
                if isinstance(f, relax.Function) and not allocates_storage(f)]
        if not todo:
            return mod
        drop = _DropKills(mod)
        for gv, func in todo:
            drop.builder_.update_func(gv, drop.visit_expr(func))
        return drop.builder_.get()
