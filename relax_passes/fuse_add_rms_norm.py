"""FuseAddRMSNorm: residual add + RMSNorm -> one kernel that also returns the sum.

What the exporters produce for ``RMSNorm(residual + x)`` (both torch exporters, after the
importer and RemoveNoOpOps; casts appear in fp16 models, which normalize in fp32)::

    s   = add(residual, x)                       # the residual stream, used again later
    sq  = power(s, 2)            | multiply(s, s)
    m   = mean(sq, axis=-1, keepdims=True)
    r   = divide(1, sqrt(add(m, eps)))  | rsqrt(add(m, eps))
    n   = multiply(s, r)
    out = multiply(w, n)  | multiply(n, w)       # Gemma: multiply(n, add(w, 1))

FuseOps makes three kernels of this (the add as the previous matmul's epilogue, ``power`` alone,
then mean..multiply): the sum makes a round trip through memory twice. This pass replaces the
chain by one ``call_tir`` of a kernel built for the call site (``add_rms_norm``: outputs
``(out, s)``; later uses of ``s`` read the second output) or, with no add in front (the first
layer's norm, QK norms), ``rms_norm``. The kernel accumulates in fp32 whatever the model's dtype.
Where the normalized row's only use is a cast (Gemma's fp16 exports scale in fp32 and cast the
row back), the kernel stores the cast's dtype and the cast's binding goes: one kernel fewer per
norm and half the bytes written, the same values (one rounding, where the cast made it).

``norm_before_gemv=True`` (the GPU pipeline): where the normalized row feeds only decode GEMVs
(``M == 1`` matmuls), directly or through a cast (Gemma's fp16 exports: ``n * (1 + w)`` in fp32,
then cast back), the add is left in front of ``rms_norm``: FuseOps makes it the previous GEMV's
epilogue (that kernel writes the residual sum) and ``FuseGEMVPrologue`` folds the norm (and the
cast) into the next GEMV, so the pair costs no kernel of its own.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax import dpl
from tvm.script import from_source

from tvm_lite.quant.kernels import MAKER_ATTR

from ..convention import NORM_ROW_STAT_BLOCK
from ._fusion import COMM_REDUCE, OPAQUE, dtype_of, maybe_cast, placeholder, prim_func, \
    run_on_functions, scalar_value, static_shape


def _pattern():
    x = dpl.wildcard()
    xf = maybe_cast(x)
    two = dpl.is_const()
    sq = dpl.is_op("relax.power")(xf, two) | dpl.is_op("relax.multiply")(xf, xf)
    m = dpl.is_op("relax.mean")(sq)
    eps = dpl.is_const()
    e = dpl.is_op("relax.add")(m, eps) | dpl.is_op("relax.add")(eps, m)
    one = dpl.is_const()
    r = dpl.is_op("relax.rsqrt")(e) | dpl.is_op("relax.divide")(one, dpl.is_op("relax.sqrt")(e))
    n = dpl.is_op("relax.multiply")(xf, r) | dpl.is_op("relax.multiply")(r, xf)
    nc = maybe_cast(n)
    w = dpl.wildcard()
    out = dpl.is_op("relax.multiply")(w, nc) | dpl.is_op("relax.multiply")(nc, w)
    return dict(root=out, x=x, xf=xf, two=two, m=m, eps=eps, one=one, r=r, n=n, nc=nc, w=w)


P = _pattern()
# the kernel stores the dtype of a cast that is the normalized row's only use (the module doc);
# False keeps the cast a kernel of its own (for A/B runs: --switch NAME:relax_passes.
# fuse_add_rms_norm.FOLD_ONLY_CAST=False)
FOLD_ONLY_CAST = True


def _dims(shape):
    """Shape text for TVMScript: static dims as literals, symbolic ones as fresh ``n<i>``."""
    names = [str(int(d)) if isinstance(d, tirx.IntImm) else f"n{i}" for i, d in enumerate(shape)]
    return names, [n for n in names if n.startswith("n")]


def _add_rms_norm_script(shape, x_dtype, w_dtype, gemma, eps, n_dtype, out_dtype):
    """TIR of add + RMSNorm with two outputs, ``(out, sum)``, in two blocks: ``sum_sq`` (the
    reduction, reading the two addends) and ``rms_norm`` (writing both outputs). Reading the
    addends twice instead of storing the sum first keeps it one GPU kernel: no block depends on
    another's global writes."""
    names, sym = _dims(shape)
    lead, d = names[:-1], int(shape[-1])
    it = [f"i{k}" for k in range(len(lead))]
    vi = [f"v{k}" for k in range(len(lead))]
    at = lambda j: ", ".join(vi + [j])  # noqa: E731
    w = f"(T.Cast(\"{n_dtype}\", w[vj])" + (f" + T.{n_dtype}(1))" if gemma else ")")
    decl = "".join(f"    {n} = T.int64()\n" for n in sym)
    return f'''
@T.prim_func(private=True, s_tir=True)
def add_rms_norm(var_x: T.handle, var_r: T.handle, w: T.Buffer(({d},), "{w_dtype}"),
                 var_out: T.handle, var_sum: T.handle):
    T.func_attr({{"tir.noalias": True, "op_pattern": {OPAQUE}, "tvm_lite.fused": "add_rms_norm"}})
{decl}    x = T.match_buffer(var_x, ({", ".join(names)},), "{x_dtype}")
    r = T.match_buffer(var_r, ({", ".join(names)},), "{x_dtype}")
    out = T.match_buffer(var_out, ({", ".join(names)},), "{out_dtype}")
    total = T.match_buffer(var_sum, ({", ".join(names)},), "{x_dtype}")
    sum_sq = T.sblock_alloc_buffer(({", ".join(lead)},), "float32")
    for {", ".join(it + ["k"])} in T.grid({", ".join(lead + [str(d)])}):
        with T.sblock("{NORM_ROW_STAT_BLOCK}"):
            {", ".join(vi + ["vk"])} = T.axis.remap("{"S" * len(vi)}R", [{", ".join(it + ["k"])}])
            with T.init():
                sum_sq[{", ".join(vi)}] = T.float32(0)
            sum_sq[{", ".join(vi)}] = sum_sq[{", ".join(vi)}] + T.Cast("float32", x[{at("vk")}] + r[{at("vk")}]) * T.Cast("float32", x[{at("vk")}] + r[{at("vk")}])
    for {", ".join(it + ["j"])} in T.grid({", ".join(lead + [str(d)])}):
        with T.sblock("rms_norm"):
            {", ".join(vi + ["vj"])} = T.axis.remap("{"S" * (len(vi) + 1)}", [{", ".join(it + ["j"])}])
            total[{at("vj")}] = x[{at("vj")}] + r[{at("vj")}]
            out[{at("vj")}] = T.Cast("{out_dtype}", T.Cast("{n_dtype}", T.Cast("float32", x[{at("vj")}] + r[{at("vj")}]) * T.rsqrt(sum_sq[{", ".join(vi)}] / T.float32({d}) + T.float32({eps!r}))) * {w})
'''


def _kernel(a, b, w, gemma: bool, eps: float, n_dtype: str, out_dtype: str):
    """The kernel for ``a (+ b)`` and weight ``w`` (``1 + w`` for Gemma): ``rms_norm`` (TE) or
    ``add_rms_norm`` (outputs ``(out, sum)``); both accumulate in fp32."""
    shape = static_shape(a)
    d = int(shape[-1])
    if b is not None:
        src = _add_rms_norm_script(shape, dtype_of(a), dtype_of(w), gemma, eps, n_dtype, out_dtype)
        return from_source(src), [a, b, w]
    ta, tw = placeholder(a, "x"), placeholder(w, "weight")
    k = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", d)), name="k")
    ss = te.compute(shape[:-1], lambda *i: te.sum(
        ta(*i, k).astype("float32") * ta(*i, k).astype("float32"), axis=k),
        name=NORM_ROW_STAT_BLOCK)

    def norm(*idx):
        *i, j = idx
        inv = tirx.rsqrt(ss(*i) / tirx.const(d, "float32") + tirx.const(eps, "float32"))
        n = (ta(*i, j).astype("float32") * inv).astype(n_dtype)
        wj = tw(j).astype(n_dtype)
        if gemma:
            wj = wj + tirx.const(1.0, n_dtype)
        return (n * wj).astype(out_dtype)

    out = te.compute(shape, norm, name="rms_norm")
    return prim_func([ta, tw, out], "rms_norm", COMM_REDUCE), [a, w]


def _match(rw, binding, var2val):
    m = P["root"].extract_matched_expr(binding.value, var2val)
    if m is None:
        return None
    call_m = m[P["m"]]
    axes = [int(a) for a in call_m.attrs.axis] if call_m.attrs.axis is not None else None
    xf = m[P["xf"]]
    shape = static_shape(xf)
    if shape is None or not isinstance(shape[-1], tirx.IntImm) or not call_m.attrs.keepdims \
            or axes is None or len(axes) != 1 or axes[0] % len(shape) != len(shape) - 1:
        return None
    if scalar_value(m[P["eps"]]) is None or (P["two"] in m and scalar_value(m[P["two"]]) != 2.0) \
            or (P["one"] in m and scalar_value(m[P["one"]]) != 1.0):
        return None
    w = m[P["w"]]
    gemma = False
    wv = var2val.get(w, w) if isinstance(w, relax.Var) else w
    if isinstance(wv, relax.Call) and isinstance(wv.op, tvm.ir.Op) and wv.op.name == "relax.add":
        lhs, rhs = wv.args
        if scalar_value(rhs) == 1.0 or scalar_value(lhs) == 1.0:  # Gemma's (1 + w)
            w, gemma = (lhs if scalar_value(rhs) == 1.0 else rhs), True
    w_shape = static_shape(w)
    if w_shape is None or len(w_shape) != 1 or int(w_shape[0]) != int(shape[-1]):
        return None
    x = m[P["x"]]  # the matcher follows bindings: x is the add itself, not its var
    x_var = rw.var_of(x)
    a, b = (x_var if x_var is not None else x), None
    if x_var is not None and isinstance(x, relax.Call) and isinstance(x.op, tvm.ir.Op) \
            and x.op.name == "relax.add" and binding.var not in rw.gemv_inputs \
            and all(static_shape(t) is not None and rw.analyzer_equal(static_shape(t), shape)
                    for t in x.args):
        a, b = x.args
    a, b = rw.visit_expr(a), (rw.visit_expr(b) if b is not None else None)
    w = rw.visit_expr(w)
    cast = None if binding.var in rw.gemv_inputs or not FOLD_ONLY_CAST \
        else _only_cast(rw, binding.var)
    out_ty = cast.ty if cast is not None else binding.var.ty
    func, args = _kernel(a, b, w, gemma, scalar_value(m[P["eps"]]), dtype_of(m[P["nc"]]),
                         out_ty.dtype)
    gv = rw.add_kernel(func, "add_rms_norm" if b is not None else "rms_norm")
    if b is None:
        out = relax.call_tir(gv, args, out_ty)
    else:
        fused = rw.builder_.emit(relax.call_tir(gv, args, [out_ty, x_var.ty]), "add_norm")
        total = rw.builder_.emit(relax.TupleGetItem(fused, 1), "residual")
        rw.redirect(x_var, total)
        out = relax.TupleGetItem(fused, 0)
    if cast is None:
        return out
    # the kernel stores the cast's dtype: the cast's binding is left out, its uses read the
    # kernel's output (the norm's own var, whose only use was the cast)
    norm = rw.builder_.emit(out, "norm")
    rw.replace_later(cast, norm)
    return norm


def _only_cast(rw, var: relax.Var) -> relax.Var | None:
    """The var of ``astype(var, dtype)`` where that cast is the only use of ``var`` (Gemma's
    fp16 exports normalize in fp32 and cast the row back), else None."""
    users = rw.users(var)
    if len(users) != 1 or not isinstance(users[0], relax.DataflowVar):
        return None
    value = rw.var2val.get(users[0])
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
            and value.op.name == "relax.astype" and value.args[0].same_as(var)):
        return None
    return users[0]


@tvm.transform.module_pass(opt_level=0, name="FuseAddRMSNorm")
class FuseAddRMSNorm:
    """Residual add + RMSNorm (and plain RMSNorm) -> one kernel each (see the module doc).
    ``self.count`` is the number of norms fused by the last run."""

    def __init__(self, norm_before_gemv: bool = False):
        self.count = 0
        self.norm_before_gemv = norm_before_gemv

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        gemv_inputs = _decode_gemv_inputs(mod) if self.norm_before_gemv else set()

        def match(rw, binding, var2val):
            rw.gemv_inputs = gemv_inputs
            return _match(rw, binding, var2val)

        mod, self.count = run_on_functions(mod, match)
        return mod


def _decode_gemv_input(call, mod) -> relax.Expr | None:
    """The input row of a decode GEMV call (``R.matmul`` with a 2-D weight or a 4-bit matmul
    kernel, output ``(1, .., 1, N)``), else None."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    shape = static_shape(call) if isinstance(call.ty, relax.TensorType) else None
    if shape is None or len(shape) < 2 or not all(
            isinstance(d, tirx.IntImm) and int(d) == 1 for d in shape[:-1]):
        return None
    if call.op.name == "relax.matmul" and static_shape(call.args[1]) is not None \
            and len(static_shape(call.args[1])) == 2:
        return call.args[0]
    if call.op.name == "relax.call_tir" and isinstance(call.args[0], tvm.ir.GlobalVar) \
            and call.args[0] in mod.get_global_vars():
        attrs = mod[call.args[0]].attrs
        maker = attrs.get(MAKER_ATTR) if attrs is not None else None
        row = call.args[1].fields[0]
        if maker is not None and str(maker.get("kind", "")) == "matmul":
            return row
    return None


def _decode_gemv_inputs(mod) -> set:
    """Vars every use of which is the input row of a decode GEMV, or a cast whose result is one
    (Gemma's fp16 exports normalize in fp32 and cast the row back before the GEMV)."""
    out = set()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        uses: dict = {}  # var -> [True (a GEMV's row) | False | the var it is cast to]

        def use(expr, as_row):
            if isinstance(expr, relax.Var):
                uses.setdefault(expr, []).append(as_row)
            elif isinstance(expr, relax.Tuple):
                for f in expr.fields:
                    use(f, False)

        for block in func.body.blocks:
            for b in block.bindings:
                val = b.value
                if isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.Op) \
                        and val.op.name == "relax.astype" and isinstance(val.args[0], relax.Var):
                    uses.setdefault(val.args[0], []).append(b.var)
                elif isinstance(val, relax.Call):
                    row = _decode_gemv_input(val, mod)
                    for arg in val.args:
                        for v in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                            use(v, row is not None and v.same_as(row))
                elif isinstance(val, relax.TupleGetItem):
                    use(val.tuple_value, False)
                else:
                    use(val, False)
        use(func.body.body, False)
        rows: set = set()

        def row_use(x) -> bool:
            return x in rows if isinstance(x, relax.Var) else bool(x)

        while True:  # a cast's input is a row once the cast's result is one
            more = {v for v, u in uses.items() if v not in rows and all(map(row_use, u))}
            if not more:
                break
            rows |= more
        out.update(rows)
    return out
