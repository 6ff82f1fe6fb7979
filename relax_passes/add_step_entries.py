"""AddStepEntries: one call per generation step, integers in and the greedy token out.

Composes the step helpers (``AddStepHelpers``) with the tuple entry points
(``AddTupledBufferEntries``) into two functions:

    prefill_step(ids: R.Tensor((1, m), "int64"), step: R.Shape([p, r]), kv_caches, [workspace],
                 params) -> R.Prim("int64")
    decode_step(step: R.Shape([t, p]), kv_caches, [workspace], params) -> R.Prim("int64")

``p`` is the cached length (the write offset ``past_len``), ``r`` the real tokens among the ``m``
of ``ids`` (the rest is padding), ``t`` the token a decode step feeds. Each builds the mask and
positions (and decode its ids) on the device, runs ``prefill_tupled`` / ``decode_tupled``, takes
the argmax of the last real row there, and returns it as an integer: the VM reads one int64 back
(``vm.builtin.tensor_to_shape``) and the caller gets a plain ``int``.

So a greedy decode step over TVM RPC is one shape made on the server (an ``ffi.Shape`` cannot
cross the link by value) and one call whose result crosses by value: two round trips, where the
host-side inputs and logits made a dozen and moved the logits row (SmolLM2: 98 KB in fp16) every
step. Locally the same entries run with the engine's buffers passed as ``ffi.Array`` tuples.

Runs right after ``AddTupledBufferEntries``; a no-op where the helpers or the tuple entries are
missing (a ``kv_cache="copy"`` build, or decoders whose inputs are not the engine's three).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..convention import (DECODE, DECODERS, GREEDY_TOKEN, PAST_LEN, STEP_INPUTS, STEP_TOKEN_IDS,
                          step, tupled)
from .add_step_helpers import shape_param


def buffer_params(func: relax.Function) -> list:
    """The parameters of a ``*_tupled`` entry after ``past_len``: the caches' tuple, the
    workspace's (if any) and the weights (one tuple, or one each), found by name."""
    names = [p.name for p in func.params]
    if PAST_LEN not in names:
        raise ValueError(f"AddStepEntries: {func.attrs.get('global_symbol')} has no {PAST_LEN} "
                         "parameter (not an in-place decoder's tuple entry)")
    return list(func.params)[names.index(PAST_LEN) + 1:]


@tvm.transform.module_pass(opt_level=0, name="AddStepEntries")
class AddStepEntries:
    """Add ``prefill_step`` and ``decode_step`` (see the module doc) for the decoders that have
    ``<name>_tupled`` entries, when the step helpers are in the module."""

    def __init__(self, decoders=DECODERS):
        self.decoders = tuple(decoders)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = {gv.name_hint: gv for gv in mod.get_global_vars()}
        if not all(h in names for h in (STEP_TOKEN_IDS, STEP_INPUTS, GREEDY_TOKEN)):
            return mod
        todo = [d for d in self.decoders if tupled(d) in names]
        if not todo:
            return mod
        bb = relax.BlockBuilder(mod)
        for name in todo:
            self._entry(bb, names, name, prefill=name != DECODE)
        return bb.get()

    @staticmethod
    def _entry(bb, names, name: str, prefill: bool) -> None:
        wrapper = names[tupled(name)]
        func = bb.get()[wrapper]
        # the tuple arguments (caches, workspace, weights) as the wrapper takes them, fresh vars
        buffers = [relax.Var(p.name, p.ty) for p in buffer_params(func)]
        attrs = {"global_symbol": step(name)}
        if "relax.force_pure" in func.attrs:
            attrs["relax.force_pure"] = func.attrs["relax.force_pure"]
        weights = len(func.params) - int(func.attrs.get("num_input", len(func.params)))
        if prefill:
            m = tirx.Var("m", "int64")
            ids = relax.Var("ids", relax.TensorType([1, m], "int64"))
            shape, (p, r) = shape_param("step", [PAST_LEN, "real"])
            params = [ids, shape, *buffers]
        else:
            shape, (t, p) = shape_param("step", ["token", PAST_LEN])
            params = [shape, *buffers]
            m = r = tirx.IntImm("int64", 1)
        if weights:  # the wrapper's static weights, not checked at every step (its "num_input")
            attrs["num_input"] = len(params) - weights
        with bb.function(step(name), params, attrs=attrs, pure=bool(func.is_pure)):
            if not prefill:
                ids = bb.emit(relax.Call(names[STEP_TOKEN_IDS], [relax.ShapeExpr([t])]))
            inputs = bb.emit(relax.Call(names[STEP_INPUTS], [relax.ShapeExpr([p, r, m])]))
            mask, pos = (bb.emit(relax.TupleGetItem(inputs, i)) for i in range(2))
            out = bb.emit(relax.Call(wrapper, [ids, mask, pos, relax.ShapeExpr([p]), *buffers]))
            logits = bb.emit(relax.TupleGetItem(out, 0)) \
                if isinstance(out.ty, relax.TupleType) else out
            token = bb.emit(relax.Call(names[GREEDY_TOKEN], [logits, relax.ShapeExpr([r - 1])]))
            # (past RemovePurityChecking: the builtin is called directly, not call_pure_packed)
            shape = bb.emit(relax.Call(relax.ExternFunc("vm.builtin.tensor_to_shape"), [token],
                                       ty_args=[relax.ShapeType(ndim=1)]))
            k = tirx.Var("next_token", "int64")
            bb.match_cast(shape, relax.ShapeType([k]))
            bb.emit_func_output(relax.prim_value(k))
