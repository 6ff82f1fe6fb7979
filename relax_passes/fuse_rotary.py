"""FuseRotary: the rotary position embedding of Q or K -> one ``rotary`` kernel.

HF's ``apply_rotary_pos_emb`` as both torch exporters spell it (after RemoveNoOpOps)::

    x1  = strided_slice(x, axes=[-1], begin=[0],   end=[D/2])
    x2  = strided_slice(x, axes=[-1], begin=[D/2], end=[D])
    rot = concat([negative(x2), x1], axis=-1)                 # rotate_half(x)
    out = add(multiply(x, cos), multiply(rot, sin))           # cos/sin broadcast over heads

becomes ``call_tir(rotary, (x, cos, sin))``: ``out[..., d] = x[..., d] * cos[..., d] +
(d < D/2 ? -x[..., d + D/2] : x[..., d - D/2]) * sin[..., d]``. The kernel is injective
(``op_pattern`` 2), so FuseOps still folds the head split in front of it (the reshape and
transpose of the projection's output) into the same kernel; what changes is that the rotation is
one readable kernel with one known structure instead of a slice/negate/concat chain for the
schedules to see through, whatever the exporter.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax import dpl

from ._fusion import INJECTIVE, dtype_of, placeholder, prim_func, run_on_functions, static_shape
from ._fusion import static_ints as _ints


def _pattern():
    x, cos, sin = dpl.wildcard(), dpl.wildcard(), dpl.wildcard()
    x1 = dpl.is_op("relax.strided_slice")(x, varg_default_wildcard=True)
    x2 = dpl.is_op("relax.strided_slice")(x, varg_default_wildcard=True)
    rot = dpl.is_op("relax.concat")(dpl.is_tuple([dpl.is_op("relax.negative")(x2), x1]))
    mul = lambda a, b: dpl.is_op("relax.multiply")(a, b) | dpl.is_op("relax.multiply")(b, a)  # noqa: E731
    xc, rs = mul(x, cos), mul(rot, sin)
    out = dpl.is_op("relax.add")(xc, rs) | dpl.is_op("relax.add")(rs, xc)
    return dict(root=out, x=x, cos=cos, sin=sin, x1=x1, x2=x2, rot=rot)


P = _pattern()


def _half_slice(call, rank: int, begin: int, end: int) -> bool:
    """``call`` is ``strided_slice(x, axes=[-1], begin=[begin], end=[end], strides=[1])``."""
    axes, b, e = (_ints(a) for a in call.args[1:4])
    strides = _ints(call.args[4]) if len(call.args) > 4 else [1]
    return (axes is not None and [a % rank for a in axes] == [rank - 1] and b == [begin]
            and e == [end] and strides in ([1], []))


def _bcast_index(t_shape, out_idx):
    """Indices into a tensor broadcast (numpy rules) to the output's rank."""
    off = len(out_idx) - len(t_shape)
    return [tirx.IntImm("int64", 0) if (isinstance(d, tirx.IntImm) and int(d) == 1)
            else out_idx[off + i] for i, d in enumerate(t_shape)]


def _kernel(x, cos, sin, out_dtype):
    shape = static_shape(x)
    d = int(shape[-1])
    half = d // 2
    tx, tc, ts = placeholder(x, "x"), placeholder(cos, "cos"), placeholder(sin, "sin")

    def body(*idx):
        *i, j = idx
        c = tc(*_bcast_index(tc.shape, idx))
        s = ts(*_bcast_index(ts.shape, idx))
        rot = tirx.if_then_else(j < half, -tx(*i, j + half), tx(*i, j - half))
        return (tx(*i, j) * c + rot * s).astype(out_dtype)

    out = te.compute(shape, body, name="rotary")
    return prim_func([tx, tc, ts, out], "rotary", INJECTIVE)


def _match(rw, binding, var2val):
    m = P["root"].extract_matched_expr(binding.value, var2val)
    if m is None:
        return None
    x, cos, sin = m[P["x"]], m[P["cos"]], m[P["sin"]]
    shape = static_shape(x)
    if shape is None or not isinstance(shape[-1], tirx.IntImm) or int(shape[-1]) % 2:
        return None
    d, rank = int(shape[-1]), len(shape)
    concat = m[P["rot"]]
    if int(concat.attrs.axis) % rank != rank - 1:
        return None
    if not (_half_slice(m[P["x1"]], rank, 0, d // 2) and _half_slice(m[P["x2"]], rank, d // 2, d)):
        return None
    for t in (cos, sin):
        ts = static_shape(t)
        if ts is None or len(ts) > rank or not isinstance(ts[-1], tirx.IntImm) \
                or int(ts[-1]) != d or dtype_of(t) != dtype_of(x):
            return None
    x_var, c_var, s_var = (rw.var_of(e) for e in (x, cos, sin))
    if x_var is None or c_var is None or s_var is None:
        return None
    args = [rw.visit_expr(v) for v in (x_var, c_var, s_var)]
    gv = rw.add_kernel(_kernel(*args, dtype_of(binding.var)), "rotary")
    return relax.call_tir(gv, args, binding.var.ty)


@tvm.transform.module_pass(opt_level=0, name="FuseRotary")
class FuseRotary:
    """rotate_half rotary embedding -> one ``rotary`` kernel per Q/K (see the module doc).
    ``self.count`` is the number of rotations fused by the last run."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = run_on_functions(mod, _match)
        return mod
