"""PlanSymbolicArena: every activation in one caller-owned arena, reused across symbolic sizes.

Runs right after TVM's ``StaticPlanBlockMemory`` (no ``tir_var_upper_bound``) and keeps what that
planner gets right: its liveness analysis and its reuse of one storage by tensors of *identical*
symbolic size. What it lacks, this pass adds:

1. **Reuse across different symbolic sizes.** A storage whose live range has ended is reused by a
   later one when ``tvm.sym.Analyzer`` proves one size bounds the other for every value of the dims
   (``seq*2304 <= seq*6144`` for all ``seq >= 0``); the block keeps the larger. TVM either refuses
   (no bound) or sizes every storage at the bound (a 2048-token bound makes a 1-token decode step
   pay for 2048 tokens).
2. **No allocation in the step.** Every storage (and every output tensor TVM leaves unplanned)
   becomes an ``R.memory.view`` at offset 0 of one of the ``workspace_<i>`` uint8 inputs, one per
   block, which the caller allocates once. (One buffer per block rather than offsets into a single
   arena: TVM kernels require a zero ``byte_offset`` on their arguments, and OpenCL buffers cannot
   be offset by pointer arithmetic.) The VM checks each view against its buffer's size.
3. **Per function.** Each function is planned on its own, so a ``decode`` function (``seq = 1``)
   gets a plan of decode-sized tensors, independent of any prefill bound.

Block sizes are symbolic expressions in the function's dims; the pass records their sum (and, for
the memory report, the unplanned and TVM-planned totals) as function attributes and adds a function
``<name>_workspace_bytes(*inputs) -> R.Shape([bytes of each block])`` (the function's own inputs,
of which it reads only the shapes) so that a runtime-only caller sizes the blocks for its largest
shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax, tirx

from ..convention import WORKSPACE_BYTES_SUFFIX, workspace_bytes

ALIGN = 64  # bytes: block sizes are rounded up to 64
WORKSPACE = "workspace"


@dataclass
class Block:
    """One workspace buffer, reused by storages whose lifetimes do not overlap."""

    size: tvm.ir.Expr  # bytes; provably >= the size of every storage placed in it
    free_after: int = -1  # binding index of its current occupant's last use
    members: list = field(default_factory=list)


@dataclass
class Request:
    """One storage (or unplanned tensor) to place: its var, byte size and live range."""

    var: relax.Var
    size: tvm.ir.Expr
    start: int
    end: int
    block: Block | None = None


def _const(value) -> tvm.ir.Expr:
    return tirx.IntImm("int64", int(value))


def _bytes(shape, dtype) -> tvm.ir.Expr:
    size = _const(tvm.runtime.DataType(str(dtype)).bits // 8)
    for dim in shape:
        size = size * dim
    return size


def _align(size: tvm.ir.Expr, analyzer) -> tvm.ir.Expr:
    return analyzer.simplify(tirx.floordiv(size + (ALIGN - 1), ALIGN) * ALIGN)


def _call_name(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def _used_vars(expr) -> list:
    return list(relax.analysis.free_vars(expr)) if isinstance(expr, relax.Expr) else []


def collect_requests(func: relax.Function) -> tuple[list[Request], list]:
    """The storages (and unplanned ``R.builtin.alloc_tensor`` results) of ``func`` with live ranges.

    A var aliases a storage if it is a tensor allocated in it, or any non-kernel value computed
    from such a var (a reshape, a view, a tuple): conservative, never too short. Kernel calls
    (calls to a GlobalVar) write into their arguments and return nothing.
    """
    bindings = [b for block in func.body.blocks for b in block.bindings]
    owner: dict = {}  # var -> set of request indices it may alias
    requests: list[Request] = []
    for i, b in enumerate(bindings):
        value, name = b.value, _call_name(b.value)
        if name == "relax.memory.alloc_storage":
            shape = value.args[0].values
            owner[b.var] = {len(requests)}
            requests.append(Request(b.var, shape[0], i, i))
            continue
        if name == "relax.builtin.alloc_tensor":
            ty = b.var.ty
            owner[b.var] = {len(requests)}
            requests.append(Request(b.var, _bytes(ty.shape.values, ty.dtype), i, i))
            continue
        used = [v for v in _used_vars(value) if v in owner]
        for v in used:
            for r in owner[v]:
                requests[r].end = max(requests[r].end, i)
        is_kernel = isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar)
        if used and not is_kernel:
            owner[b.var] = set().union(*(owner[v] for v in used))
    for v in _used_vars(func.body.body):  # returned: live to the end
        for r in owner.get(v, ()):
            requests[r].end = len(bindings)
    return requests, bindings


def plan(requests: list[Request], analyzer) -> list[Block]:
    """Greedy first fit over live ranges, with size relations proven symbolically."""
    blocks: list[Block] = []
    for req in sorted(requests, key=lambda r: r.start):
        free = [b for b in blocks if b.free_after < req.start]
        fits = [b for b in free if analyzer.can_prove(b.size >= req.size)]
        grows = [b for b in free if analyzer.can_prove(b.size <= req.size)]
        if fits:  # the smallest block that provably holds it
            block = fits[0]
            for b in fits[1:]:
                if analyzer.can_prove(b.size <= block.size):
                    block = b
        elif grows:  # a smaller free block, grown to this size (still holds its earlier members)
            block = grows[-1]
            block.size = req.size
        else:
            block = Block(req.size)
            blocks.append(block)
        block.free_after = req.end
        block.members.append(req)
        req.block = block
    return blocks


def _analyzer(func) -> tvm.sym.Analyzer:
    """An analyzer that knows every symbolic dim of ``func`` is a non-negative size."""
    analyzer = tvm.sym.Analyzer()
    for var in relax.analysis.defined_symbolic_vars(func):
        analyzer.update(var, tvm.sym.ConstIntBound(0, tvm.sym.ConstIntBound.POS_INF), override=True)
    return analyzer


def _rewrite(func: relax.Function, requests, bindings, blocks) -> relax.Function:
    """Storages and unplanned tensors -> views of their block's ``workspace_<i>`` input."""
    buffers = [relax.Var(f"{WORKSPACE}_{i}", relax.TensorType(
        [tirx.Var(f"workspace_{i}_bytes", "int64")], "uint8")) for i in range(len(blocks))]
    buffer_of = {id(block): buf for block, buf in zip(blocks, buffers)}
    by_var = {r.var: r for r in requests}
    new_bindings, storage_buffer = [], {}
    for b in bindings:
        name = _call_name(b.value)
        if name == "relax.memory.alloc_storage":
            storage_buffer[b.var] = buffer_of[id(by_var[b.var].block)]
            continue  # no storage: its tensors are views of the block's buffer
        if name == "relax.memory.alloc_tensor" and b.value.args[0] in storage_buffer:
            storage, offset, shape, dtype = list(b.value.args)[:4]
            assert int(offset.value) == 0, "StaticPlanBlockMemory places tensors at offset 0"
            value = relax.op.memory.view(storage_buffer[storage], shape, dtype.value)
            b = relax.VarBinding(b.var, value)
        elif name == "relax.builtin.alloc_tensor":
            shape, dtype = b.value.args[0], b.value.args[1]
            value = relax.op.memory.view(buffer_of[id(by_var[b.var].block)], shape, dtype.value)
            b = relax.VarBinding(b.var, value)
        new_bindings.append(b)
    body = relax.SeqExpr([relax.BindingBlock(new_bindings)], func.body.body)
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs \
        else len(func.params)
    params = list(func.params[:num_input]) + buffers + list(func.params[num_input:])
    new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return new.with_attr("num_input", num_input + len(buffers))


@tvm.transform.module_pass(opt_level=0, name="PlanSymbolicArena")
class PlanSymbolicArena:
    """Plan each Relax function's activations into ``workspace_<i>`` inputs (see the module doc).

    ``only_with_attr``: plan only the functions that have this attribute (the pipeline plans the
    decoders' ``prefill``/``decode``; other modules keep TVM's plan and their signature).
    """

    def __init__(self, only_with_attr: str | None = None):
        self.only_with_attr = only_with_attr

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or gv.name_hint.endswith(WORKSPACE_BYTES_SUFFIX):
                continue
            if self.only_with_attr and self.only_with_attr not in (func.attrs or {}):
                continue
            requests, bindings = collect_requests(func)
            analyzer = _analyzer(func)
            blocks = plan(requests, analyzer)
            sizes = [_align(b.size, analyzer) for b in blocks]
            total = analyzer.simplify(sum(sizes, _const(0)))
            new = _rewrite(func, requests, bindings, blocks)
            tensors = [b for b in bindings
                       if _call_name(b.value) in ("relax.memory.alloc_tensor",
                                                  "relax.builtin.alloc_tensor")]
            unplanned = _const(0)
            for b in tensors:
                unplanned = unplanned + _bytes(b.var.ty.shape.values, b.var.ty.dtype)
            tvm_planned = _const(0)
            for r in requests:
                tvm_planned = tvm_planned + r.size
            new = new.with_attrs({
                "tvm_lite.workspace_bytes": total,
                "tvm_lite.unplanned_bytes": analyzer.simplify(unplanned),
                "tvm_lite.tvm_planned_bytes": analyzer.simplify(tvm_planned),
                "tvm_lite.arena_blocks": len(blocks),
                "tvm_lite.storages": len(requests),
            })
            out[gv] = new
            name = workspace_bytes(gv.name_hint)
            out[name] = _size_function(func, sizes).with_attr("global_symbol", name)
        return out


def _size_function(func: relax.Function, sizes: list) -> relax.Function:
    """``f(*inputs) -> R.Shape([bytes of each block])``: takes the same inputs as ``func`` (only
    their shapes are read), so a caller sizes the buffers without knowing the dims' names."""
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs \
        else len(func.params)
    params = [relax.Var(p.name, p.ty) for p in func.params[:num_input]]
    return relax.Function(params, relax.ShapeExpr(sizes), relax.ShapeType(sizes), True)
