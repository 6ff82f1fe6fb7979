"""MergeSharedInputProjections: projections that read the same activation -> one wider matmul.

An attention block multiplies the normed hidden state by three weights (q, k, v) and a gated MLP
by two (gate, up). Each is a GEMV in decode: a kernel launch (two for a split-K GEMV) that reads
its weight once. Merged, the weights are read by one kernel with more output columns, which also
gives a small model's GEMV enough workgroups to fill the GPU without splitting ``K``.

Found by structure, not by name: in one dataflow block, two or more bindings

    y_i = matmul(x, W_i)                                   # W_i: [K, N_i] weight (parameter/constant)
    y_i = call_tir(<fmt>_matmul, (x, codes_i, scale_i[, zero_i]))     # a 4-bit weight (E0M4, int4)

with the same ``x`` (the same Relax var), the same dtype/format/K/group size become

    y   = matmul(x, concat(W_1..W_n, axis=1))              # or the 4-bit kernel for sum(N_i)
    y_i = strided_slice(y, axes=[-1], begin=[o_i], end=[o_i + N_i])

GQA's narrower k/v are just other ``N_i``. The 4-bit formats store every packed tensor with ``N``
last (``codes: uint16[K/4, N]``, ``scale``/``zero: [K/G, N]``, :mod:`tvm_lite.quant.format`),
so a merged 4-bit weight is the members' packed tensors concatenated along ``N``: the merge is
bit-exact and runs after the quantizer, which keeps quantizing (and calibrating) one named weight
at a time. When every member's only use is ``add(y_i, b_i)`` with a 1-D bias (Qwen's q/k/v),
the biases are merged too (one ``add`` on ``y``, which fuses into the GEMV's epilogue) and the
slices replace the adds.

The slices are views for the fusion passes behind: the q slice joins the rotary kernel (head
split and rotation are injective), ``FuseKVAppend`` reads k and v at their column offsets in
``y``, and ``FuseSiluMul`` reads gate and up as the two halves of ``y``.

**Gate and up interleaved** (``interleave_gate_up=True``, which a build asks for where its target's
GEMM stores the activation: ``pipeline.interleaves_gate_up``): where a group is exactly a gated
MLP's two projections (``act(gate) * up``, SiLU or tanh-GELU, as ``FuseSiluMul`` finds it), the
merged weight's columns alternate in blocks of :data:`~tvm_lite.convention.GATE_BLOCK` (8): gate's
columns ``8q .. 8q+7`` at ``16q .. 16q+7``, up's at ``16q+8 .. 16q+15``. Gate and up are then
reshaped views (``y``, ``2N`` columns, as ``[.., N/8, 2, 8]``, block 0 or 1) instead of the halves,
so the values are the same; what changes is that a GEMM's tile of output columns holds both
operands of each of its activations, which lets a GEMM store ``act(gate) * up`` itself
(``relax_passes/fuse_gated_epilogue.py``): half the stores and no activation kernel.

The weights must have values: the imported module's ``params`` (``tvm_lite.from_onnx``; the
pass concatenates them and updates ``params`` and ``tvm_lite.param_names``; a weight that is
still used elsewhere keeps its parameter) or embedded constants. ``compile_model`` runs it on the
imported (and quantized) module, before the weights are detached; a module whose weights are
parameters without values is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx

from tvm_lite.quant.kernels import ATTR as DEQUANT_ATTR, MAKER_ATTR, matmul_func

from tvm_lite.convention import GATE_BLOCK

from ._fusion import emit_like, var_uses
from .fuse_silu_mul import P as ACTIVATIONS

MATMUL, ADD, CALL_TIR = "relax.matmul", "relax.add", "relax.call_tir"
PARAM_NAMES, PARAMS = "tvm_lite.param_names", "params"


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _static(expr) -> list | None:
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values") \
            and all(isinstance(d, tirx.IntImm) for d in ty.shape.values):
        return [int(d) for d in ty.shape.values]
    return None


@dataclass
class _Member:
    var: relax.Var  # the projection's output
    weights: list  # [W] or [codes, scale(, zero)]: parameters with values or constants
    n: int
    bias: tuple | None = None  # (the add binding's var, the bias)


@dataclass
class _Group:
    key: tuple
    x: relax.Var
    call: relax.Call  # the first member's call (its attrs / kernel maker)
    members: list = field(default_factory=list)
    merged_weights: list = field(default_factory=list)  # merged parameter Vars or Constants
    merged_bias: object = None
    out: relax.Var | None = None  # the merged projection (with its bias) once emitted
    interleaved: bool = False  # [gate, up], columns alternating in blocks of GATE_BLOCK
    blocks: relax.Var | None = None  # the merged [.., 2N] as [.., N / GATE_BLOCK, 2, GATE_BLOCK]

    @property
    def n(self) -> int:
        return sum(m.n for m in self.members)

    def offset(self, member) -> int:
        return sum(m.n for m in self.members[:self.members.index(member)])

    @property
    def biased(self) -> bool:
        return all(m.bias is not None for m in self.members)


class _Weights:
    """A function's weights: parameters with attached values, or constants."""

    def __init__(self, func: relax.Function):
        n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else 0
        has = func.attrs is not None and PARAMS in func.attrs and PARAM_NAMES in func.attrs
        params = list(func.params)[n_in:]
        self.values = dict(zip(params, func.attrs[PARAMS])) if has else {}
        self.names = dict(zip(params, (str(n) for n in func.attrs[PARAM_NAMES]))) if has else {}

    def known(self, expr) -> bool:
        return expr in self.values or isinstance(expr, tvm.ir.GenericConst)

    def array(self, expr) -> np.ndarray:
        return (self.values[expr] if isinstance(expr, relax.Var) else expr.value).numpy()

    def name(self, expr) -> str:
        return self.names.get(expr, "const")


def _dequant_maker(mod, call) -> dict | None:
    gv = call.args[0]
    if not isinstance(gv, tvm.ir.GlobalVar) or gv not in mod.get_global_vars():
        return None
    prim = mod[gv]
    if not isinstance(prim, tirx.PrimFunc) or prim.attrs is None or MAKER_ATTR not in prim.attrs:
        return None
    maker = {str(k): v for k, v in prim.attrs[MAKER_ATTR].items()}
    if str(maker["kind"]) != "matmul":
        return None
    return {**maker, "fmt": str(prim.attrs[DEQUANT_ATTR])}


def _projection(mod, weights: _Weights, value):
    """(key, x, weight operands, N) of a projection by a known weight, else None."""
    name = _op_name(value)
    if name == MATMUL and len(value.args) == 2:
        x, w = value.args
        shape = _static(w)
        if isinstance(x, relax.Var) and weights.known(w) and shape is not None and len(shape) == 2:
            key = ("dense", str(w.ty.dtype), shape[0], str(value.attrs.out_dtype))
            return key, x, [w], shape[1]
    if name == CALL_TIR:
        maker = _dequant_maker(mod, value)
        args = value.args[1].fields if isinstance(value.args[1], relax.Tuple) else []
        if maker is None or len(args) < 3 or not isinstance(args[0], relax.Var) \
                or not all(weights.known(a) for a in args[1:]):
            return None
        key = ("4bit", maker["fmt"], int(maker["k"]), int(maker["group_size"]),
               str(maker["x_dtype"]), str(maker["out_dtype"]))
        return key, args[0], list(args[1:]), int(maker["n"])
    return None


def _find_groups(mod, func: relax.Function, weights: _Weights,
                 interleave: bool) -> list[_Group]:
    uses = var_uses(func)
    groups: list[_Group] = []
    for bi, block in enumerate(func.body.blocks):
        by_key: dict = {}
        members: dict = {}  # output var -> member (to attach biases)
        for b in block.bindings:
            found = _projection(mod, weights, b.value)
            if found is not None:
                key, x, ws, n = found
                group = by_key.setdefault((bi, x, key), _Group(key, x, b.value))
                members[b.var] = _Member(b.var, ws, n)
                group.members.append(members[b.var])
                continue
            if _op_name(b.value) == ADD:  # y_i + b_i, the bias 1-D [N_i]
                a, c = b.value.args
                y, bias = (a, c) if a in members else (c, a)
                m = members.get(y)
                if m is not None and m.bias is None and uses.get(y) == 1 and weights.known(bias) \
                        and _static(bias) == [m.n] and bias.ty.dtype == y.ty.dtype:
                    m.bias = (b.var, bias)
        groups += [g for g in by_key.values() if len(g.members) > 1]
    if interleave:
        _mark_gated_pairs(func, groups)
    return groups


def _mark_gated_pairs(func: relax.Function, groups: list[_Group]) -> None:
    """Mark (and order as [gate, up]) each unbiased two-member group whose outputs are the
    operands of a gated activation (``FuseSiluMul``'s patterns), ``N`` a multiple of ``2 x
    GATE_BLOCK``. (Other uses of gate or up read the same values from the views.)"""
    var2val = relax.analysis.get_var2val(func)
    by_value = {}  # a member's projection call -> (group, member)
    for g in groups:
        if len(g.members) == 2 and not g.biased and g.members[0].n == g.members[1].n \
                and g.members[0].n % (2 * GATE_BLOCK) == 0:
            for m in g.members:
                by_value[var2val[m.var]] = (g, m)
    if not by_value:
        return
    for block in func.body.blocks:
        for b in block.bindings:
            for act in ("silu", "gelu"):
                m = ACTIVATIONS[act].extract_matched_expr(b.value, var2val)
                if m is None:
                    continue
                gate, up = by_value.get(m[ACTIVATIONS["g"]]), by_value.get(m[ACTIVATIONS["up"]])
                if gate is not None and up is not None and gate[0] is up[0] \
                        and gate[1] is not up[1]:
                    gate[0].members = [gate[1], up[1]]
                    gate[0].interleaved = True
                break


@relax.expr_functor.mutator
class _Merger(relax.PyExprMutator):
    def __init__(self, mod, groups: list[_Group]):
        super().__init__(mod)
        self.plan: dict = {}  # binding var -> (group, member, role): "slice" | "skip"
        for g in groups:
            for m in g.members:
                if g.biased:
                    self.plan[m.var] = (g, m, "skip")
                    self.plan[m.bias[0]] = (g, m, "slice")
                else:
                    self.plan[m.var] = (g, m, "slice")
        self.kernels: dict = {}

    def _merged(self, g: _Group, like: relax.Var):
        x = self.visit_expr(g.x)
        if g.key[0] == "dense":
            y = relax.op.matmul(x, g.merged_weights[0], out_dtype=g.call.attrs.out_dtype)
        else:
            _, fmt, k, group_size, x_dtype, out_dtype = g.key
            lead = list(x.ty.shape.values)[:-1]
            prim = matmul_func(fmt, lead, k, g.n, group_size, x_dtype, out_dtype)
            name = str(prim.attrs["global_symbol"])
            if name not in self.kernels:
                self.kernels[name] = self.builder_.add_func(prim.without_attr("global_symbol"), name)
            y = relax.call_tir(self.kernels[name], [x, *g.merged_weights],
                               relax.TensorType(lead + [g.n], out_dtype))
        y = emit_like(self.builder_, y, like, "merged_proj")
        if g.biased:
            y = emit_like(self.builder_, relax.op.add(y, g.merged_bias), like, "merged_proj_bias")
        return y

    def visit_var_binding_(self, binding):
        planned = self.plan.get(binding.var)
        if planned is None:
            return super().visit_var_binding_(binding)
        g, m, role = planned
        if g.out is None:  # the group's first binding: the merged projection goes here
            g.out = self._merged(g, binding.var)
        if role == "skip":  # a biased member's own matmul: its add becomes the slice
            return
        rank = len(g.out.ty.shape.values)
        if g.interleaved:  # block 0 (gate) or 1 (up) of each pair of GATE_BLOCK columns
            lead = list(g.out.ty.shape.values)[:-1]
            if g.blocks is None:
                blocks = relax.op.reshape(g.out, lead + [m.n // GATE_BLOCK, 2, GATE_BLOCK])
                g.blocks = emit_like(self.builder_, blocks, binding.var, "gate_up_blocks")
            half = g.members.index(m)
            view = relax.op.strided_slice(g.blocks, axes=[rank], begin=[half], end=[half + 1],
                                          assume_inbound=True)
            view = emit_like(self.builder_, view, binding.var, f"{binding.var.name}_blocks")
            view = relax.op.reshape(view, lead + [m.n])
        else:
            off = g.offset(m)
            view = relax.op.strided_slice(g.out, axes=[rank - 1], begin=[off], end=[off + m.n],
                                          assume_inbound=True)
        self.set_var_remap(binding.var, emit_like(self.builder_, view, binding.var))


def _merge_values(arrays: list) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(arrays, axis=-1))


def _interleave_values(arrays: list) -> np.ndarray:
    """[gate, up] (``N`` last, the same shape) as one array whose last axis alternates blocks of
    ``GATE_BLOCK`` columns: gate's block ``q`` at ``2q``, up's at ``2q + 1``."""
    gate, up = arrays
    lead, n = gate.shape[:-1], gate.shape[-1]
    pair = np.stack([gate.reshape(*lead, n // GATE_BLOCK, GATE_BLOCK),
                     up.reshape(*lead, n // GATE_BLOCK, GATE_BLOCK)], axis=-2)
    return np.ascontiguousarray(pair.reshape(*lead, 2 * n))


@tvm.transform.module_pass(opt_level=0, name="MergeSharedInputProjections")
class MergeSharedInputProjections:
    """Projections of the same activation -> one matmul + slices (see the module doc).
    ``self.merged`` is the number of projections merged by the last run (``self.groups`` the
    number of merged matmuls). ``interleave_gate_up``: a gated MLP's gate and up interleaved
    (the module doc); otherwise gate then up, the halves of the merged output."""

    def __init__(self, func_name: str = "main", interleave_gate_up: bool = False):
        self.func_name = func_name
        self.interleave_gate_up = interleave_gate_up
        self.merged = 0
        self.groups = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.merged = self.groups = 0
        if not any(gv.name_hint == self.func_name for gv in mod.get_global_vars()):
            return mod
        func = mod[self.func_name]
        weights = _Weights(func)
        groups = _find_groups(mod, func, weights, self.interleave_gate_up)
        if not groups:
            return mod
        new_params, new_names, new_values = [], [], []
        for g in groups:
            parts = [[weights.array(w) for w in m.weights] for m in g.members]
            operands = list(zip(*[m.weights for m in g.members]))
            merge = _interleave_values if g.interleaved else _merge_values
            for role, arrays in enumerate(zip(*parts)):
                g.merged_weights.append(self._weight(weights, operands[role], merge(arrays),
                                                     new_params, new_names, new_values))
            if g.biased:
                bias = [m.bias[1] for m in g.members]
                g.merged_bias = self._weight(weights, bias,
                                             _merge_values([weights.array(b) for b in bias]),
                                             new_params, new_names, new_values)
        rw = _Merger(mod, groups)
        body = rw.visit_expr(func.body)
        func = self._signature(func, body, weights, new_params, new_names, new_values)
        rw.builder_.update_func(mod.get_global_var(self.func_name), func)
        out = relax.transform.DeadCodeElimination()(rw.builder_.get())
        self.groups = len(groups)
        self.merged = sum(len(g.members) for g in groups)
        return out

    @staticmethod
    def _weight(weights: _Weights, parts: list, value: np.ndarray, new_params, new_names,
                new_values):
        """The merged weight: a new parameter (with its value) if the parts are parameters,
        else a constant."""
        if not all(isinstance(p, relax.Var) for p in parts):
            return relax.const(value)
        first = weights.name(parts[0]).replace(".", "_").replace("/", "_")
        var = relax.Var(f"{first}_merged{len(parts)}", relax.TensorType(list(value.shape), str(value.dtype)))
        new_params.append(var)
        new_names.append("+".join(weights.name(p) for p in parts))
        new_values.append(tvm.runtime.tensor(value))
        return var

    def _signature(self, func, body, weights: _Weights, new_params, new_names, new_values):
        """``func`` over ``body``: the parameters still used, then the merged ones; ``params``
        and ``tvm_lite.param_names`` follow."""
        used = set(relax.analysis.free_vars(body))
        n_in = len(func.params) - len(weights.values) if weights.values else len(func.params)
        keep = [p for p in list(func.params)[n_in:] if p in used]
        params = list(func.params)[:n_in] + keep + new_params
        out = relax.Function(params, body, func.ret_ty if hasattr(func, "ret_ty") else None,
                             func.is_pure, func.attrs)
        if weights.values:
            out = out.with_attr(PARAM_NAMES, [weights.names[p] for p in keep] + new_names)
            out = out.with_attr(PARAMS, [weights.values[p] for p in keep] + new_values)
        return out


__all__ = ["MergeSharedInputProjections"]
