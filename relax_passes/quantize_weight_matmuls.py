"""QuantizeWeightMatmuls: every matmul by a weight parameter becomes a dequant-fused 4-bit matmul.

The importer makes each large ONNX initializer a parameter of ``main`` after its ``num_input``
real inputs, named in the ``tvm_lite.param_names`` attribute (weights the graph transposes, like
a tied lm_head, were already transposed on the host into ``*_T`` parameters). So a projection is
``R.matmul(x, W)`` with ``W: [K, N]`` a parameter, and the embedding is ``R.take(E, ids, axis=0)``.

Given the quantized weights by parameter name (:class:`tvm_lite.quant.QuantizedWeight`), the pass

* replaces ``R.matmul(x, W)`` by ``R.call_tir(<fmt>_matmul, (x, codes, scale[, zero]))`` -- the
  generic TIR of :mod:`tvm_lite.quant.kernels`, E0M4 or int4 -- after ``x * act_scale`` when the
  weight carries AWQ's input scale;
* replaces ``R.take(E, ids, axis=0)`` by ``R.call_tir(<fmt>_take, (ids, codes, scale[, zero]))``
  when the table is given (quantized transposed, ``[D, V]``; a tied lm_head shares it);
* swaps the weight parameter for the packed ones in the signature, in ``tvm_lite.param_names``
  (``<name>.<fmt>.codes`` ...) and in the attached ``params`` values. A weight that is still used
  elsewhere keeps its parameter.

:func:`find_weight_uses` is the matcher, shared with calibration (which needs the same matmuls'
inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm_lite.errors import UserError

MATMUL = "relax.matmul"
TAKE = "relax.take"


@dataclass
class WeightUse:
    """One use of a weight parameter the pass can quantize."""

    name: str  # the parameter's name in tvm_lite.param_names
    var: relax.Var
    kind: str  # "matmul" | "take"
    role: str  # "proj" | "lm_head" | "embedding"
    k: int  # reduction dim (the embedding's D)
    n: int  # output dim (the embedding's V)
    input: relax.Expr | None = None  # the matmul's activation (None for take)


def _param_names(func: relax.Function) -> dict:
    """param Var -> name, for the parameters after ``num_input``."""
    if func.attrs is None or "tvm_lite.param_names" not in func.attrs:
        return {}
    n_in = int(func.attrs["num_input"]) if "num_input" in func.attrs else 0
    names = [str(n) for n in func.attrs["tvm_lite.param_names"]]
    return dict(zip(list(func.params)[n_in:], names))


def _static_2d(var) -> tuple | None:
    ty = var.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    dims = ty.shape.values
    if len(dims) != 2 or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return int(dims[0]), int(dims[1])


def _vocab(func: relax.Function) -> int | None:
    """The last dim of the first output (the logits), if static."""
    ty = func.body.body.ty if hasattr(func.body, "body") else None
    if isinstance(ty, relax.TupleType):
        ty = ty.fields[0]
    if isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values"):
        last = ty.shape.values[-1]
        if isinstance(last, tvm.tirx.IntImm):
            return int(last)
    return None


def find_weight_uses(mod: tvm.IRModule, func_name: str = "main") -> list[WeightUse]:
    """Every ``matmul(x, W)`` and ``take(E, ids, axis=0)`` whose ``W``/``E`` is a 2-D parameter,
    in program order. ``role`` tells projections from the lm_head (the matmul whose N is the
    logits' last dim) and the embedding."""
    func = mod[func_name]
    names = _param_names(func)
    vocab = _vocab(func)
    found: list[WeightUse] = []

    def visit(expr):
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return
        if expr.op.name == MATMUL and len(expr.args) == 2 and expr.args[1] in names:
            w = expr.args[1]
            shape = _static_2d(w)
            if shape is not None:
                role = "lm_head" if vocab is not None and shape[1] == vocab else "proj"
                found.append(WeightUse(names[w], w, "matmul", role, shape[0], shape[1], expr.args[0]))
        elif (expr.op.name == TAKE and expr.args[0] in names and expr.attrs is not None
              and int(expr.attrs.axis) == 0):
            w = expr.args[0]
            shape = _static_2d(w)
            if shape is not None:
                found.append(WeightUse(names[w], w, "take", "embedding", shape[1], shape[0]))

    relax.analysis.post_order_visit(func.body, visit)
    return found


@tvm_ffi.register_error  # keeps its type when raised inside the pass (through TVM's FFI)
class QuantizeError(UserError):
    """A weight the pass was asked to quantize that it cannot; the message names it."""


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, weights: dict, names: dict):
        super().__init__(mod)
        from tvm_lite.quant import kernels

        self.kernels = kernels
        self.weights = weights
        self.names = names  # Var -> name
        self.packed: dict[int, dict] = {}  # id(QuantizedWeight) -> {role: Var}
        self.order: list = []  # (name, QuantizedWeight) in first-use order
        self.funcs: dict[str, tvm.ir.GlobalVar] = {}
        self.rewritten = {"matmul": 0, "take": 0}

    def _vars_for(self, name: str, qw, dtype: str):
        key = id(qw)
        if key not in self.packed:
            base = name.replace(".", "_").replace("/", "_").replace(":", "_")
            vs = {role: relax.Var(f"{base}_{role}", relax.TensorType(list(a.shape), str(a.dtype)))
                  for role, a in qw.arrays().items()}
            if qw.act_scale is not None:
                vs["act_scale"] = relax.Var(f"{base}_act_scale", relax.TensorType([qw.k], dtype))
            self.packed[key] = vs
            self.order.append((name, qw))
        return self.packed[key]

    def _func(self, prim_func):
        name = str(prim_func.attrs["global_symbol"])
        if name not in self.funcs:
            self.funcs[name] = self.builder_.add_func(prim_func.without_attr("global_symbol"), name)
        return self.funcs[name]

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == MATMUL and len(call.args) == 2 and call.args[1] in self.names:
            name = self.names[call.args[1]]
            if name in self.weights:
                return self._matmul(call, name, self.weights[name])
        if call.op.name == TAKE and call.args[0] in self.names and int(call.attrs.axis) == 0:
            name = self.names[call.args[0]]
            if name in self.weights:
                return self._take(call, name, self.weights[name])
        return call

    def _matmul(self, call, name, qw):
        x, w = call.args
        xty, wty = x.ty, w.ty
        if not isinstance(xty, relax.TensorType) or xty.shape is None or not hasattr(xty.shape, "values"):
            raise QuantizeError(f"cannot quantize the matmul by '{name}': its input has no known shape")
        lead = list(xty.shape.values)[:-1]
        k_in = xty.shape.values[-1]
        if (qw.k, qw.n) != tuple(int(d) for d in wty.shape.values) or int(k_in) != qw.k:
            raise QuantizeError(f"quantized '{name}' is [{qw.k}, {qw.n}] but the matmul multiplies "
                                f"{list(xty.shape.values)} by {list(wty.shape.values)}")
        vs = self._vars_for(name, qw, xty.dtype)
        if "act_scale" in vs:
            x = self.builder_.emit(relax.op.multiply(x, vs["act_scale"]))
        prim = self.kernels.matmul_func(qw.fmt, lead, qw.k, qw.n, qw.group_size, xty.dtype,
                                        call.ty.dtype)
        args = [x, vs["codes"], vs["scale"]] + ([vs["zero"]] if "zero" in vs else [])
        self.rewritten["matmul"] += 1
        return relax.call_tir(self._func(prim), args, call.ty)

    def _take(self, call, name, qw):
        table, ids = call.args
        v, d = (int(s) for s in table.ty.shape.values)
        if (qw.k, qw.n) != (d, v):
            raise QuantizeError(f"the quantized embedding '{name}' must be the transposed table "
                                f"[{d}, {v}], got [{qw.k}, {qw.n}]")
        if qw.act_scale is not None:
            raise QuantizeError(f"embedding '{name}' cannot carry an AWQ input scale")
        ity = ids.ty
        if not isinstance(ity, relax.TensorType) or ity.shape is None or not hasattr(ity.shape, "values"):
            raise QuantizeError(f"cannot quantize the embedding '{name}': ids have no known shape")
        vs = self._vars_for(name, qw, call.ty.dtype)
        prim = self.kernels.take_func(qw.fmt, list(ity.shape.values), ity.dtype, d, v, qw.group_size,
                                      call.ty.dtype)
        args = [ids, vs["codes"], vs["scale"]] + ([vs["zero"]] if "zero" in vs else [])
        self.rewritten["take"] += 1
        return relax.call_tir(self._func(prim), args, call.ty)


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeightMatmuls")
class QuantizeWeightMatmuls:
    """Replace matmuls (and takes) by weight parameters with dequant-fused 4-bit kernels.

    ``weights``: parameter name -> ``QuantizedWeight`` (``[K, N]``; for an embedding, the
    transposed table ``[D, V]``). Names not used by any matmul/take are an error.
    """

    def __init__(self, weights: dict, func_name: str = "main"):
        self.weights = dict(weights)
        self.func_name = func_name
        self.stats: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        names = _param_names(func)
        known = set(names.values())
        missing = [n for n in self.weights if n not in known]
        if missing:
            raise QuantizeError(f"no weight parameter named {missing[:3]} in '{self.func_name}' "
                                f"(parameters: {sorted(known)[:5]}...)")
        rw = _Rewriter(mod, self.weights, names)
        body = rw.visit_expr(func.body)
        n_in = int(func.attrs["num_input"])
        used = {v for v in relax.analysis.free_vars(body)}
        old_params = list(func.params)
        values = list(func.attrs["params"]) if "params" in func.attrs else None
        new_params, new_names, new_values = list(old_params[:n_in]), [], []
        for i, var in enumerate(old_params[n_in:]):
            if var in names and names[var] in self.weights and var not in used:
                continue  # fully replaced by its packed tensors
            new_params.append(var)
            new_names.append(names[var])
            if values is not None:
                new_values.append(values[i])
        for name, qw in rw.order:
            vs = rw.packed[id(qw)]
            arrays = dict(qw.arrays())
            if qw.act_scale is not None:
                arrays["act_scale"] = qw.act_scale.astype(str(vs["act_scale"].ty.dtype))
            for role, var in vs.items():
                new_params.append(var)
                new_names.append(f"{name}.{qw.fmt}.{role}")
                if values is not None:
                    new_values.append(tvm.runtime.tensor(np.ascontiguousarray(arrays[role])))
        new_func = relax.Function(new_params, body, func.ret_ty if hasattr(func, "ret_ty") else None,
                                  func.is_pure, func.attrs)
        new_func = new_func.with_attr("tvm_lite.param_names", new_names)
        if values is not None:
            new_func = new_func.with_attr("params", new_values)
        rw.builder_.update_func(mod.get_global_var(self.func_name), new_func)
        self.stats = dict(rw.rewritten, quantized_tensors=len(rw.order))
        out = rw.builder_.get()
        return out.with_attr("tvm_lite.quant_stats", {k: int(v) for k, v in self.stats.items()})
