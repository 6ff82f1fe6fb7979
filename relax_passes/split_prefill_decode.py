"""SplitPrefillDecode: ``main`` becomes ``prefill`` (any number of new tokens) and ``decode`` (one).

Transformer-Lite runs prefill and decode through different kernels and plans their memory apart.
The imported ``main`` has a symbolic number of new tokens (the dims of its first input, the token
ids: ``seq`` in tvm_lite's exports). This pass keeps it as ``prefill`` and adds ``decode``, the
same function with those dims bound to 1 (``relax.transform.BindSymbolicVars``), so that every
later phase — fusion, schedule rules, memory planning — sees decode's static token count: GEMV
shapes instead of GEMM, and activations that do not depend on how long a prompt may be.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..convention import DECODE, MAIN, PREFILL


@tvm.transform.module_pass(opt_level=0, name="SplitPrefillDecode")
class SplitPrefillDecode:
    """``main`` -> ``prefill`` + ``decode`` (the token dims of the first input bound to 1).

    ``only_with_attr``: split only a ``main`` that has this attribute (the pipeline splits the
    decoders whose KV cache was rewritten in place: ``tvm_lite.kv_cache_names``).
    """

    def __init__(self, only_with_attr: str | None = None):
        self.only_with_attr = only_with_attr

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod[MAIN]
        if self.only_with_attr and self.only_with_attr not in (func.attrs or {}):
            return mod
        first = func.params[0].ty
        if not isinstance(first, relax.TensorType) or not isinstance(first.shape, relax.ShapeExpr):
            raise ValueError("SplitPrefillDecode: main's first input (the token ids) has no shape")
        token_dims = [d for d in first.shape.values if isinstance(d, tirx.Var)]
        if not token_dims:
            raise ValueError("SplitPrefillDecode: main's first input has no symbolic dim")
        out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != MAIN},
                           attrs=mod.attrs)
        base = func.without_attr("global_symbol") if "global_symbol" in (func.attrs or {}) \
            else func
        out[PREFILL] = base.with_attr("global_symbol", PREFILL)
        # a copy: no Var is shared by two functions
        out[DECODE] = relax.utils.copy_with_new_vars(base).with_attr("global_symbol", DECODE)
        decode_dims = [d for d in out[DECODE].params[0].ty.shape.values if isinstance(d, tirx.Var)]
        out = relax.transform.BindSymbolicVars({d: 1 for d in decode_dims}, DECODE)(out)
        return out
