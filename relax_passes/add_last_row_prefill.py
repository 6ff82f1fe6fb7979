"""AddLastRowPrefill: ``prefill_last``, a prefill that computes the logits of one row only.

A greedy (or sampled) generation step needs the logits of the prompt's last real token, but
``prefill`` computes them for every row: the vocabulary projection of all ``n`` rows, which on a
decoder of today's vocabularies is about a fifth of a prefill's FLOPs (SmolLM2: 49,152 x 576,
Llama-3.2-1B: 128,256 x 2,048, 21% of each model's weights), plus the final norm and, before it,
everything else that works row by row. On the H200 the Llama-1B shape's lm_head over 512 rows took
1.47 ms, 16% of the whole prefill.

This pass adds ``prefill_last``: ``prefill``'s parameters (so the tuple entries, memory plan and
step entries treat it like ``prefill``), with its *tail* -- the ops between the logits and the
last op that mixes rows -- run on one row. Walking back from the logits, an op belongs to the tail
when its output row ``i`` depends on its inputs' row ``i`` only (``row-local``):

* elementwise ops whose other operands carry no sequence axis (weights, constants, a norm's
  ``(1, n, 1)`` statistic of the same row): ``add``, ``multiply``, ``sqrt``, ``astype``, ``tanh``
  (soft-capping), SiLU's ``sigmoid`` ...;
* reductions, scans, softmax and norms over trailing axes (``mean(x^2, axis=-1)``,
  ``rms_norm``);
* ``matmul`` of a row tensor by a weight, and the 4-bit dequant matmul kernels (their leading
  dims are rebound to the call's by ``BindDequantKernelShapes``, which runs after);
* ``strided_slice`` on trailing axes (the merged gate/up split), and ``reshape`` of the trailing
  axes alone (``(1, n, 2N) -> (1, n, N/8, 2, 8)``: gate and up merged interleaved).

The walk stops at the first op that is not (attention's reshape, an embedding lookup): each such
input of the tail is cut to one row with ``take(x, idx, axis=1)``, and the tail is replayed on the
cut rows. On tvm_lite's exports the tail is the last layer's o-projection, MLP and both norms, then
the lm_head (and Gemma's final soft-capping): all of them run as GEMVs on one row.

Which row: the last one whose attention mask is 1, ``idx = sum(mask) - past_len - 1``, computed on
the device (the step entries build the mask: ``past_len + real`` ones, then padding). The original
``prefill`` is unchanged (every row's logits: ``Engine.forward``, the quality evaluation); the
``prefill_step`` entries call ``prefill_last`` (``relax_passes/add_step_entries.py``).

A no-op when the module has no in-place ``prefill`` or its logits are not made by row-local ops.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from tvm_lite.quant.kernels import MAKER_ATTR

from ..convention import PAST_LEN, PREFILL, PREFILL_LAST

ROW = 1  # the sequence axis of a (1, n, ...) activation
CALL_TIR = "relax.call_tir"
RESHAPE = "relax.reshape"
UNARY = {f"relax.{n}" for n in ("exp", "log", "tanh", "sigmoid", "sqrt", "rsqrt", "negative",
                                 "astype", "erf", "abs", "square", "clip", "cos", "sin",
                                 "nn.silu", "nn.gelu", "nn.gelu_tanh", "nn.relu")}
BINARY = {f"relax.{n}" for n in ("add", "subtract", "multiply", "divide", "power", "maximum",
                                  "minimum")}
REDUCE = {f"relax.{n}" for n in ("mean", "sum", "max", "min", "variance", "cumsum", "cumprod",
                                  "nn.softmax", "nn.log_softmax")}
NORMS = {"relax.nn.rms_norm", "relax.nn.layer_norm"}


def _dims(expr) -> list | None:
    ty = getattr(expr, "ty", None)
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    return None


def _mentions(dims: list, n: tirx.Var) -> bool:
    return any(any(v.same_as(n) for v in tirx.analysis.undefined_vars(d))
               for d in dims if not isinstance(d, tirx.IntImm))


class _Rows:
    """What the walk needs to know of ``prefill``: its sequence dim and producers."""

    def __init__(self, func: relax.Function, mod: tvm.IRModule):
        self.mod = mod
        ids = _dims(func.params[0])
        self.n = ids[ROW] if ids and len(ids) == 2 and isinstance(ids[ROW], tirx.Var) else None
        self.bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}

    def is_row(self, expr) -> bool:
        """A ``(1, n, ...)`` activation."""
        dims = _dims(expr)
        return bool(dims and len(dims) >= 2 and isinstance(dims[0], tirx.IntImm)
                    and int(dims[0]) == 1 and dims[ROW].same_as(self.n))

    def no_rows(self, expr, broadcast_to: int | None = None) -> bool:
        """An operand without the sequence axis; for an elementwise op of ``broadcast_to`` dims,
        also broadcast over the rows (size 1 or absent at the row axis)."""
        dims = _dims(expr)
        if dims is None:  # a shape, a scalar, a string: no rows; a tensor of unknown shape: no
            return not isinstance(getattr(expr, "ty", None), relax.TensorType)
        if _mentions(dims, self.n):
            return False
        if broadcast_to is None:
            return True
        at = ROW - (broadcast_to - len(dims))  # the operand's axis aligned with the row axis
        return at < 0 or (isinstance(dims[at], tirx.IntImm) and int(dims[at]) == 1)

    def row_local(self, call) -> list | None:
        """The row operands of ``call`` if its output row i reads their row i only, else None."""
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return None
        op, args = call.op.name, list(call.args)
        out = _dims(call)
        if out is None or len(out) < 2 or not out[ROW].same_as(self.n):
            return None
        if op == CALL_TIR:
            callee = self.mod[args[0]] if isinstance(args[0], relax.GlobalVar) else None
            inner = list(args[1].fields) if isinstance(args[1], relax.Tuple) else []
            if callee is None or MAKER_ATTR not in (callee.attrs or {}) or not inner:
                return None
            rows, rest = inner[:1], inner[1:]
        elif op in UNARY:
            rows, rest = args[:1], args[1:]
        elif op in BINARY:
            rows = [a for a in args if self.is_row(a)]
            rest = [a for a in args if not self.is_row(a)]
        elif op in REDUCE | NORMS or op == "relax.strided_slice":
            rows, rest = args[:1], args[1:]
            axes = call.attrs.axis if op in REDUCE else call.attrs.axes if op in NORMS \
                else [int(v.value) for v in args[1].fields]
            axes = [axes] if isinstance(axes, int) else axes  # cumsum's and softmax's one axis
            if axes is None or any(int(a) % len(_dims(args[0])) <= ROW for a in axes):
                return None
            if op == "relax.strided_slice":
                rest = []
        elif op == "relax.matmul":
            rows, rest = args[:1], args[1:]
            if len(_dims(args[0]) or []) != 3 or len(_dims(args[1]) or []) != 2:
                return None
        elif op == RESHAPE:  # (1, n, ...) -> (1, n, ...): the trailing axes only
            rows, rest = args[:1], []
            if not isinstance(out[0], tirx.IntImm) or int(out[0]) != 1:
                return None
        else:
            return None
        if not rows or not all(self.is_row(r) for r in rows):
            return None
        broadcast = len(out) if op in BINARY else None
        if not all(self.no_rows(r, broadcast) for r in rest):
            return None
        return rows

    def tail(self, logits: relax.Var) -> tuple[list, list]:
        """(the tail's vars in binding order, the row tensors it reads from outside). A var
        joins the tail when it is row-local and every use of it is in the tail: a row the rest
        of the model needs anyway (the residual stream that feeds the last layer's attention) is
        cut to one row, not computed again on it."""
        users: dict = {}
        for v, value in self.bound.items():
            relax.analysis.post_order_visit(
                value, lambda e, v=v: users.setdefault(e, set()).add(v)
                if isinstance(e, relax.Var) else None)
        tail, read = set(), {}
        for v in reversed(list(self.bound)):
            if not v.same_as(logits) and not (users.get(v) and users[v] <= tail):
                continue
            rows = self.row_local(self.bound[v])
            if rows is not None:
                tail.add(v)
                read[v] = rows
        order = [v for v in self.bound if v in tail]
        cut = []
        for v in order:
            cut += [r for r in read[v] if r not in tail and r not in cut]
        return order, cut


def _logits_var(func: relax.Function, bound: dict):
    """(the logits var, the returned tuple or None): the function's result or its first field."""
    ret = func.body.body
    value = bound.get(ret)
    if isinstance(value, relax.Tuple):
        first = value.fields[0]
        return (first if isinstance(first, relax.Var) else None), value
    return ret, None


def last_row_function(func: relax.Function, mod: tvm.IRModule) -> relax.Function | None:
    """``func`` (an in-place ``prefill``) with its row-local tail run on the last real row, or
    None where there is no such tail."""
    rows = _Rows(func, mod)
    if rows.n is None or len(func.params) < 4 or func.params[3].name != PAST_LEN:
        return None
    logits, tup = _logits_var(func, rows.bound)
    if logits is None or not rows.is_row(logits):
        return None
    order, cut = rows.tail(logits)
    if not order or not cut:
        return None
    bb = relax.BlockBuilder()
    new: list = []
    last = func.body.blocks[-1]  # the new bindings go at its end
    dataflow = isinstance(last, relax.DataflowBlock)

    def emit(expr, name: str, output: bool = False) -> relax.Var:
        expr = bb.normalize(expr)
        var = (relax.DataflowVar if dataflow and not output else relax.Var)(name, expr.ty)
        new.append(relax.VarBinding(var, expr))
        return var

    mask, past_len = func.params[1], func.params[3]
    (past,) = past_len.ty.values
    real = emit(relax.op.sum(mask, axis=[1]), "mask_ones")
    first = emit(relax.op.arange(past + 1, past + 2, 1, "int64"), "past_plus_one")
    idx = emit(relax.op.subtract(real, first), "last_row")
    remap = {v: emit(relax.op.take(v, idx, axis=ROW, mode="clip"), f"{v.name}_last")
             for v in cut}

    def arg(a):
        if isinstance(a, relax.Tuple):
            return relax.Tuple([arg(f) for f in a.fields])
        return remap.get(a, a)

    for v in order:
        call = rows.bound[v]
        one_row = [*_dims(call)[:ROW], tirx.IntImm("int64", 1), *_dims(call)[ROW + 1:]]
        if call.op.name == CALL_TIR:
            expr = relax.Call(call.op, [call.args[0], arg(call.args[1]), *call.args[2:]],
                              call.attrs, [relax.TensorType(one_row, call.ty.dtype)])
        elif call.op.name == RESHAPE:  # (its target shape names the rows)
            expr = relax.op.reshape(arg(call.args[0]), one_row)
        else:
            expr = relax.Call(call.op, [arg(a) for a in call.args], call.attrs, call.ty_args)
        remap[v] = emit(expr, f"{v.name}_last", output=v.same_as(logits) and tup is None)
    if tup is not None:
        out = emit(relax.Tuple([remap[logits], *tup.fields[1:]]), "out_last", output=True)
    else:
        out = remap[logits]
    return prefill_variant(func, new, out, PREFILL_LAST)


def prefill_variant(func: relax.Function, bindings: list, out: relax.Var,
                    name: str) -> relax.Function:
    """``func`` with ``bindings`` appended to its last block and ``out`` as its result: the same
    parameters and attributes, fresh vars (none shared with ``func``), global symbol ``name``."""
    last = func.body.blocks[-1]
    blocks = list(func.body.blocks)
    blocks[-1] = type(last)(list(last.bindings) + bindings)
    made = relax.Function(func.params, relax.SeqExpr(blocks, out), out.ty, func.is_pure,
                          func.attrs)
    return relax.utils.copy_with_new_vars(made).with_attr("global_symbol", name)


def add_prefill_variant(mod: tvm.IRModule, kv_attr: str, name: str, make) -> tvm.IRModule:
    """``mod`` with ``make(prefill)`` added as ``name``, where ``mod`` has an in-place
    ``prefill`` (attribute ``kv_attr``), no ``name`` yet, and ``make`` returns a function (not
    None); else ``mod``."""
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    if PREFILL not in names or name in names:
        return mod
    func = mod[names[PREFILL]]
    if not isinstance(func, relax.Function) or kv_attr not in (func.attrs or {}):
        return mod
    made = make(func)
    if made is None:
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[name] = made
    return out


@tvm.transform.module_pass(opt_level=0, name="AddLastRowPrefill")
class AddLastRowPrefill:
    """Add ``prefill_last`` next to an in-place ``prefill`` that has the attribute ``kv_attr``
    (see the module doc)."""

    def __init__(self, kv_attr: str):
        self.kv_attr = kv_attr
        self.tail_ops = 0  # how many ops of the tail run on one row (for tests and logs)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def make(func):
            made = last_row_function(func, mod)
            if made is not None:
                self.tail_ops = sum(1 for block in made.body.blocks for b in block.bindings) \
                    - sum(1 for block in func.body.blocks for b in block.bindings)
            return made

        return add_prefill_variant(mod, self.kv_attr, PREFILL_LAST, make)
