"""FuseGatedEpilogue: a prefill GEMM and the gated activation that reads it -> one kernel.

With gate and up merged and interleaved (``relax_passes/merge_shared_input_projections.py``,
as ``pipeline.interleaves_gate_up`` asks), a gated MLP's prefill is, after FuseOps and FuseTIR::

    y = call_tir(<fmt>_matmul / matmul, (x, weights..))   # [.., M, 2N]: gate, up alternating in
                                                          # blocks of GATE_BLOCK columns
    h = call_tir(fused_reshape_..._silu_mul, (y,))        # [.., M, N] = act(gate) * up

The GEMM writes ``2N`` columns that the activation kernel reads back once. This pass groups the
two calls into one primitive function and lets FuseTIR make it one PrimFunc: the matmul block,
then the activation reading its output. The prefill GEMM's CUDA schedules
(``schedules/gpu_gemm_mma.py``, ``gpu_gemm_wgmma_ws.py``) store ``act(gate) * up`` from their
accumulators: ``N`` columns written instead of ``2N``, and no activation kernel.

What it fuses: ``y`` used once, by a call_tir whose PrimFunc has exactly one input, ``y``, and
computes a ``silu_mul`` or ``gelu_tanh_mul`` block (``FuseSiluMul``'s kernels) over ``y`` viewed
as ``[.., N / GATE_BLOCK, 2, GATE_BLOCK]`` (the interleaved layout; the halves layout is left
alone), and ``y`` made by a call_tir whose rows are not a static 1 (a prefill GEMM: a decode
step's or a last row's GEMV keeps the activation for the next GEMV's prologue,
``FuseGEMVPrologue``), and -- given ``takes`` -- only where ``takes(GEMM PrimFunc)`` says the
target's GEMM kernel stores the fused form (``schedules.gated_gemm_check(target)``: the pipeline
runs the pass only on targets that have one).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from tvm_lite.convention import GATE_BLOCK

from ._fusion import emit_like, var_uses

ACTIVATION_BLOCKS = ("silu_mul", "gelu_tanh_mul")  # FuseSiluMul's kernels' block names
PRIMITIVE = "Primitive"  # the attribute FuseTIR fuses a function by


def _prim(mod, call):
    """The PrimFunc a ``call_tir`` calls (None otherwise)."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.call_tir" and len(call.args) == 2):
        return None
    gv = call.args[0]
    if not isinstance(gv, tvm.ir.GlobalVar) or gv not in mod.get_global_vars():
        return None
    func = mod[gv]
    return func if isinstance(func, tirx.PrimFunc) else None


def _blocks(func: tirx.PrimFunc) -> list:
    found = []

    def visit(block, mutator):
        found.append(block)
        return mutator.default_mutate(block)

    tvm_ffi.structural_mutate(func.body, [(s_tir.SBlock, visit)])
    return found


def _interleaved_activation(func: tirx.PrimFunc, y: relax.Var) -> str | None:
    """The activation block's name if ``func`` is a gated activation of one input ``y`` in the
    interleaved layout (a view of ``y`` as ``[.., N / GATE_BLOCK, 2, GATE_BLOCK]``), else None."""
    if len(func.params) != 2 or not all(isinstance(p, tirx.Buffer) for p in func.params):
        return None  # (TVM 0.27: a PrimFunc's parameters are its buffers, or scalars)
    inp = func.params[0]
    if len(inp.shape) != len(y.ty.shape.values):
        return None
    blocks = _blocks(func)
    act = next((b.name_hint for b in blocks if b.name_hint in ACTIVATION_BLOCKS), None)
    viewed = any(tuple(int(d) for d in w.source.shape[-2:] if isinstance(d, tirx.IntImm))
                 == (2, GATE_BLOCK) and len(w.source.shape) == len(inp.shape) + 2
                 for b in blocks for w in b.writes)
    return act if viewed else None


def _prefill_rows(var: relax.Var) -> bool:
    """``var``'s rows (its second-to-last dim) are not a static 1."""
    shape = var.ty.shape.values
    rows = shape[-2] if len(shape) >= 2 else None
    return rows is not None and not (isinstance(rows, tirx.IntImm) and int(rows) == 1)


def _pairs(mod, func: relax.Function, takes=None) -> dict:
    """activation binding var -> (the GEMM's binding var, its call, the activation's name)."""
    uses, var2val = var_uses(func), relax.analysis.get_var2val(func)
    found = {}
    for block in func.body.blocks:
        for b in block.bindings:
            act = _prim(mod, b.value)
            if act is None:
                continue
            args = b.value.args[1].fields if isinstance(b.value.args[1], relax.Tuple) else []
            if len(args) != 1 or not isinstance(args[0], relax.Var) or uses.get(args[0]) != 1:
                continue
            y = args[0]
            gemm = var2val.get(y)
            if _prim(mod, gemm) is None or not _prefill_rows(y):
                continue
            name = _interleaved_activation(act, y)
            if name is None or (takes is not None and not takes(_prim(mod, gemm))):
                continue
            found[b.var] = (y, gemm, name)
    return found


@relax.expr_functor.mutator
class _Grouper(relax.PyExprMutator):
    def __init__(self, mod, pairs: dict):
        super().__init__(mod)
        self.pairs = pairs
        self.gemms = {y for y, _, _ in pairs.values()}
        self.count = 0

    def visit_var_binding_(self, binding):
        if binding.var in self.gemms:  # emitted inside the group, at its one use
            return
        if binding.var not in self.pairs:
            return super().visit_var_binding_(binding)
        y, gemm, act = self.pairs[binding.var]
        args = [self.visit_expr(a) for a in gemm.args[1].fields]
        params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(args)]
        name = f"{gemm.args[0].name_hint}_gated_{act}"  # (FuseTIR names the kernel after it)
        bb = relax.BlockBuilder()
        with bb.function(name, params, attrs={PRIMITIVE: True}, private=True):
            with bb.dataflow():
                inner = bb.emit(relax.call_tir(gemm.args[0], params, y.ty))
                out = bb.emit_output(relax.call_tir(binding.value.args[0], [inner],
                                                    binding.var.ty))
            bb.emit_func_output(out)
        gv = self.builder_.add_func(bb.get()[name], name)
        self.set_var_remap(binding.var, emit_like(self.builder_, relax.Call(gv, args), binding.var))
        self.count += 1


@tvm.transform.module_pass(opt_level=0, name="FuseGatedEpilogue")
class FuseGatedEpilogue:
    """A prefill GEMM + the interleaved gated activation reading it -> one PrimFunc (see the
    module doc). ``takes``: ``takes(GEMM PrimFunc) -> bool``, the GEMMs whose kernel stores the
    fused form (None: every one). ``self.count``: the pairs fused by the last run."""

    def __init__(self, takes=None):
        self.takes = takes
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.count = 0
        plans = {gv: _pairs(mod, f, self.takes) for gv, f in mod.functions_items()
                 if isinstance(f, relax.Function)}
        if not any(plans.values()):
            return mod
        for gv, pairs in plans.items():
            if not pairs:
                continue
            rw = _Grouper(mod, pairs)
            rw.builder_.update_func(gv, rw.visit_expr(mod[gv]))
            mod = rw.builder_.get()
            self.count += rw.count
        mod = relax.transform.FuseTIR()(mod)
        return relax.transform.DeadCodeElimination()(mod)


__all__ = ["FuseGatedEpilogue"]
