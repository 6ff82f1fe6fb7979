"""PackWeightPanels: a CPU build's weight matrices stored panel-major, chosen at compile time.

A decode step is a chain of GEMVs ``y = x @ W`` over ``W: [K, N]`` (torch's layout). A CPU task
computes ``P`` output columns (two vector registers: ``schedules/cpu_target.py``), so in that
layout it reads, for every ``k``, ``4P`` bytes of a row that is ``4N`` bytes from the next one
(the lm_head: 128-byte pieces of rows 196 KB apart): each piece its own page and DRAM row, and
the hardware prefetchers lose the stream. This pass stores every weight the way the kernels read
it::

    W[K, N]  ->  Wp[N / P, K, P]          Wp[b, k, c] = W[k, b P + c]

so one task's columns are one contiguous ``K x P`` block and a thread's share of the matrix is one
stream, front to back. 4-bit weights (``tvm_lite.quant``) get the same layout for their codes,
scales and zeros (``[rows, N] -> [N / P, rows, P]``).

The pass runs on the imported ``main`` with its weights attached (``params``), after quantization,
for CPU targets (``compile_model``; ``tvm-lite tune`` imports the same way):

* ``R.matmul(x, W)`` with ``W`` a 2-D weight parameter becomes ``R.call_tir`` of
  ``tvm_lite.quant.kernels.panel_matmul_func`` over ``Wp``;
* a 4-bit matmul (``call_tir`` of a ``tvm_lite.quant.kernels.matmul_func`` kernel) becomes the
  same kernel with ``panel=P`` over the packed tensors (for one row it also takes the scales out
  of each group: ``kernels.scales_per_group``);
* the parameters are swapped in the signature and their values packed (same names, same order).

A weight is packed only if every use of it is such a matmul and ``N`` is a multiple of ``P``
(a tied embedding table, say, keeps its layout). Both kernels carry a kernel maker, so
``BindDequantKernelShapes`` rebuilds them for prefill's and decode's shapes like the 4-bit ones;
the CPU rules (``schedules/cpu_gemm.py``, ``cpu_dequant.py``) recognise the layout from the
kernel's index expressions.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_lite.quant import kernels

MATMUL = "relax.matmul"
CALL_TIR = "relax.call_tir"


def pack_panels(array: np.ndarray, panel: int) -> np.ndarray:
    """``T[rows, N] -> T[N / panel, rows, panel]`` (numpy; the values the kernels read)."""
    rows, n = array.shape
    return np.ascontiguousarray(array.reshape(rows, n // panel, panel).transpose(1, 0, 2))


def unpack_panels(array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_panels`."""
    blocks, rows, panel = array.shape
    return np.ascontiguousarray(array.transpose(1, 0, 2).reshape(rows, blocks * panel))


def _static_shape(expr) -> tuple | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    dims = ty.shape.values
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _vars_in(expr):
    """The Relax vars among a call's arguments (tuples opened)."""
    if isinstance(expr, relax.Var):
        yield expr
    elif isinstance(expr, relax.Tuple):
        for field in expr.fields:
            yield from _vars_in(field)
    elif isinstance(expr, relax.Call):
        for arg in expr.args:
            yield from _vars_in(arg)


class _Finder:
    """Which weight parameters can be packed: every use a packable matmul, ``N % P == 0``."""

    def __init__(self, mod, params: set, panel: int):
        self.mod, self.params, self.panel = mod, params, panel
        self.uses: dict = {}  # param -> uses anywhere
        self.packable: dict = {}  # param -> uses as a packable matmul's weight

    def weights_of(self, call) -> list | None:
        """The weight parameters of ``call`` if it is a packable matmul, else None."""
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return None
        if call.op.name == MATMUL and len(call.args) == 2 and call.args[1] in self.params:
            shape = _static_shape(call.args[1])
            if shape is not None and len(shape) == 2 and shape[1] % self.panel == 0:
                return [call.args[1]]
            return None
        if call.op.name == CALL_TIR:
            maker = _maker(self.mod, call.args[0])
            args = list(call.args[1].fields)
            if maker is None or str(maker["kind"]) != "matmul" or "panel" in maker \
                    or int(maker["n"]) % self.panel or not all(a in self.params for a in args[1:]):
                return None
            return args[1:]
        return None

    def visit(self, func) -> set:
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                for var in _vars_in(value):
                    if var in self.params:
                        self.uses[var] = self.uses.get(var, 0) + 1
                for var in self.weights_of(value) or []:
                    self.packable[var] = self.packable.get(var, 0) + 1
        for var in _vars_in(func.body.body):
            if var in self.params:
                self.uses[var] = self.uses.get(var, 0) + 1
        return {v for v, n in self.packable.items() if self.uses.get(v) == n}


def _maker(mod, gv) -> dict | None:
    if not isinstance(gv, tvm.ir.GlobalVar) or gv not in mod.get_global_vars():
        return None
    func = mod[gv]
    if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None \
            or kernels.MAKER_ATTR not in func.attrs:
        return None
    return {str(k): v for k, v in func.attrs[kernels.MAKER_ATTR].items()}


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, finder: _Finder, packed: dict):
        super().__init__(mod)
        self.mod, self.finder, self.packed = mod, finder, packed  # packed: old param -> new
        self.funcs: dict = {}
        self.rewritten = 0

    def _func(self, prim):
        name = str(prim.attrs["global_symbol"])
        if name not in self.funcs:
            self.funcs[name] = self.builder_.add_func(prim.without_attr("global_symbol"), name)
        return self.funcs[name]

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        weights = self.finder.weights_of(call)
        if not weights or not all(w in self.packed for w in weights):
            return call
        panel = self.finder.panel
        self.rewritten += 1
        if call.op.name == MATMUL:
            x, w = call.args
            k, n = _static_shape(w)
            prim = kernels.panel_matmul_func(list(x.ty.shape.values)[:-1], k, n, panel,
                                             str(x.ty.dtype), str(w.ty.dtype), str(call.ty.dtype))
            return relax.call_tir(self._func(prim), [x, self.packed[w]], call.ty)
        m = _maker(self.mod, call.args[0])
        x = call.args[1].fields[0]
        prim = kernels.matmul_func(str(self.mod[call.args[0]].attrs[kernels.ATTR]),
                                   list(x.ty.shape.values)[:-1], int(m["k"]), int(m["n"]),
                                   int(m["group_size"]), str(m["x_dtype"]), str(m["out_dtype"]),
                                   panel)
        return relax.call_tir(self._func(prim), [x, *(self.packed[w] for w in weights)], call.ty)


@tvm.transform.module_pass(opt_level=0, name="PackWeightPanels")
class PackWeightPanels:
    """Store ``main``'s weight matrices panel-major, ``panel`` columns a block (see the module
    doc). ``stats`` after a run: matmuls rewritten and weights packed."""

    def __init__(self, panel: int, func_name: str = "main"):
        if panel < 1:
            raise ValueError(f"panel width must be positive, got {panel}")
        self.panel = panel
        self.func_name = func_name
        self.stats: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        n_in = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 0
        params = list(func.params)[n_in:]
        finder = _Finder(mod, set(params), self.panel)
        chosen = finder.visit(func)
        if not chosen:
            self.stats = {"matmul": 0, "packed_weights": 0}
            return mod
        packed = {}
        for var in params:
            if var in chosen:
                rows, n = _static_shape(var)
                shape = [n // self.panel, rows, self.panel]
                packed[var] = relax.Var(var.name, relax.TensorType(shape, str(var.ty.dtype)))
        rw = _Rewriter(mod, finder, packed)
        body = rw.visit_expr(func.body)
        values = list(func.attrs["params"]) if "params" in func.attrs else None
        if values is not None:
            values = [tvm.runtime.tensor(pack_panels(v.numpy(), self.panel)) if var in packed else v
                      for var, v in zip(params, values)]
        new_params = list(func.params)[:n_in] + [packed.get(v, v) for v in params]
        new_func = relax.Function(new_params, body, func.ret_ty if hasattr(func, "ret_ty") else None,
                                  func.is_pure, func.attrs)
        if values is not None:
            new_func = new_func.with_attr("params", values)
        rw.builder_.update_func(mod.get_global_var(self.func_name), new_func)
        self.stats = {"matmul": rw.rewritten, "packed_weights": len(packed)}
        return rw.builder_.get()  # (the replaced kernels go in phase 1's dead-code pass)


__all__ = ["PackWeightPanels", "pack_panels", "unpack_panels"]
