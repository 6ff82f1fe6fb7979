"""FuseSiluMul: the gated MLP's activation, ``act(gate) * up`` -> one ``silu_mul`` kernel.

What the exporters produce (after the importer and RemoveNoOpOps)::

    SiLU (Llama, Qwen, SmolLM2):  multiply(multiply(g, sigmoid(g)), up)   | multiply(silu(g), up)
    GELU-tanh (Gemma):            multiply(gelu_tanh(g), up)
                                  | multiply(0.5 * g * (1 + tanh(c * (g + 0.044715 * g^3))), up)

(either operand order everywhere). The replacement ``call_tir(silu_mul | gelu_tanh_mul, (g, up))``
is elementwise (``op_pattern`` 0): FuseOps still folds it into the gate projection's epilogue,
so the kernel count stays that of the stock pipeline; the activation becomes one kernel with one
known structure (computed in fp32 for fp16 models) instead of a chain of ops.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx
from tvm.relax import dpl

from ._fusion import ELEMWISE, dtype_of, maybe_cast, placeholder, prim_func, run_on_functions, \
    scalar_value, static_shape


def _mul(a, b):
    return dpl.is_op("relax.multiply")(a, b) | dpl.is_op("relax.multiply")(b, a)


def _patterns():
    g, up = dpl.wildcard(), dpl.wildcard()
    gf = maybe_cast(g)
    silu = _mul(gf, dpl.is_op("relax.sigmoid")(gf)) | dpl.is_op("relax.nn.silu")(gf)
    # 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 * g^3))), as torch decomposes it
    cube = dpl.is_op("relax.power")(gf, dpl.is_const()) \
        | _mul(gf, _mul(gf, gf))
    inner = dpl.is_op("relax.add")(gf, _mul(dpl.is_const(), cube)) \
        | dpl.is_op("relax.add")(_mul(dpl.is_const(), cube), gf)
    th = dpl.is_op("relax.tanh")(_mul(dpl.is_const(), inner))
    one_th = dpl.is_op("relax.add")(dpl.is_const(), th) | dpl.is_op("relax.add")(th, dpl.is_const())
    gelu = dpl.is_op("relax.nn.gelu_tanh")(gf) \
        | _mul(_mul(dpl.is_const(), gf), one_th) | _mul(_mul(gf, one_th), dpl.is_const()) \
        | _mul(gf, _mul(dpl.is_const(), one_th))
    return dict(g=g, up=up, silu=_mul(maybe_cast(silu), up), gelu=_mul(maybe_cast(gelu), up))


P = _patterns()


def _kernel(gate, up, act: str, out_dtype: str):
    tg, tu = placeholder(gate, "gate"), placeholder(up, "up")

    def body(*i):
        x = tg(*i).astype("float32")
        if act == "silu":
            a = x * tirx.sigmoid(x)
        else:
            c = tirx.const(math.sqrt(2.0 / math.pi), "float32")
            a = tirx.const(0.5, "float32") * x * (tirx.const(1.0, "float32") + tirx.tanh(
                c * (x + tirx.const(0.044715, "float32") * x * x * x)))
        return (a.astype(dtype_of(up)) * tu(*i)).astype(out_dtype)

    out = te.compute(static_shape(gate), body, name=f"{act}_mul")
    return prim_func([tg, tu, out], f"{act}_mul", ELEMWISE)


def _match(rw, binding, var2val):
    for act in ("silu", "gelu"):
        m = P[act].extract_matched_expr(binding.value, var2val)
        if m is None:
            continue
        g, up = m[P["g"]], m[P["up"]]
        if act == "gelu" and not _gelu_tanh_constants(m):
            return None
        gs, us = static_shape(g), static_shape(up)
        if gs is None or us is None or not rw.analyzer_equal(gs, us) \
                or not rw.analyzer_equal(gs, static_shape(binding.var)):
            return None
        g_var, up_var = rw.var_of(g), rw.var_of(up)
        if g_var is None or up_var is None:
            return None
        args = [rw.visit_expr(g_var), rw.visit_expr(up_var)]
        act_name = "silu" if act == "silu" else "gelu_tanh"
        gv = rw.add_kernel(_kernel(*args, act_name, dtype_of(binding.var)), f"{act_name}_mul")
        return relax.call_tir(gv, args, binding.var.ty)
    return None


def _gelu_tanh_constants(m) -> bool:
    """The decomposed GELU's constants are tanh-GELU's (0.5, 1, sqrt(2/pi), 0.044715, 3)."""
    consts = sorted(round(v, 4) for v in (scalar_value(e) for e in m.values()) if v is not None)
    if not consts:  # relax.nn.gelu_tanh itself
        return True
    want = {0.5, 1.0, round(math.sqrt(2 / math.pi), 4), 0.0447, 3.0}
    return set(consts) <= want and {0.5, 1.0, 0.0447}.issubset(set(consts))


@tvm.transform.module_pass(opt_level=0, name="FuseSiluMul")
class FuseSiluMul:
    """``silu(gate) * up`` and ``gelu_tanh(gate) * up`` -> one kernel (see the module doc).
    ``self.count`` is the number of products fused by the last run."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = run_on_functions(mod, _match)
        return mod
