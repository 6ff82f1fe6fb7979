"""AddStepEntries: one call per generation step, integers in and the greedy token out.

Composes the step helpers (``AddStepHelpers``) with the tuple entry points
(``AddTupledBufferEntries``) into two functions:

    prefill_step(ids: R.Tensor((1, m), "int64"), step: R.Shape([p, r]), kv_caches, [workspace],
                 params) -> R.Prim("int64")
    decode_step(step: R.Shape([t, p]), kv_caches, [workspace], params) -> R.Prim("int64")

``p`` is the cached length (the write offset ``past_len``), ``r`` the real tokens among the ``m``
of ``ids`` (the rest is padding), ``t`` the token a decode step feeds. Each builds the mask and
positions (and decode its ids) on the device, runs ``prefill_last_tupled`` (``prefill_tupled``
where the module has no ``prefill_last``: ``relax_passes/add_last_row_prefill.py``) /
``decode_tupled``, takes the argmax of the last real row there, and returns it as an integer:
the VM reads one int64 back (``vm.builtin.tensor_to_shape``) and the caller gets a plain ``int``.

So a greedy decode step over TVM RPC is one shape made on the server (an ``ffi.Shape`` cannot
cross the link by value) and one call whose result crosses by value: two round trips, where the
host-side inputs and logits made a dozen and moved the logits row (SmolLM2: 98 KB in fp16) every
step.

A third entry chains decode steps on the device:

    decode_chain(token: R.Tensor((1,), "int64"), step: R.Shape([p]), kv_caches, [workspace],
                 params) -> R.Tensor((1,), "int64")

takes the token a step feeds as a device tensor (the previous chain step's output) and returns
the greedy token as one, without reading it back: the host can queue several steps before it
reads their tokens, so the GPU does not wait for the host between steps
(``Engine(run_ahead=...)``).

A prompt's chunks before its last need no token at all:

    prefill_chain_flat(ids: R.Tensor((1, m), "int64"), step: R.Shape([p, r]), *caches,
                       *workspace, *weights) -> the cache writes

runs ``prefill_fill`` (``relax_passes/add_cache_fill_prefill.py``: the K/V writes, no logits;
where the module has no ``prefill_fill``, ``prefill_last`` with the greedy token left on the
device) and returns nothing the host reads, so the host queues the next chunk while the GPU
runs this one (``Engine.prefill_greedy``). Its tuple form ``prefill_chain`` (the caches,
workspace and weights as the server-side tuples) is what a remote engine calls: over RPC a
prompt's chunks before its last then compute no logits and send nothing back but the call's
return handle.

A fourth, where ``decode`` writes its K/V row at its position (``DecodeWritesAtPosition``),
is a step a CUDA graph can replay:

    decode_padded(tokens: R.Tensor((T,), "int64"), position: R.Tensor((1,), "int64"),
                  step: R.Shape([p]), kv_caches, [workspace], params) -> R.Tensor((1,), "int64")

It feeds ``tokens[position]`` at row ``position`` and attends over ``p + 1`` keys, the ones after
``position`` masked (the engine passes ``p + 1`` rounded up to a bucket), then writes the greedy
token to ``tokens[position + 1]`` and adds 1 to ``position``, on the device. Every step of a
bucket is then the same call on the same buffers (``tvm_lite/cuda_graphs.py``).

Each also comes as ``prefill_step_flat`` / ``decode_step_flat`` / ``decode_chain_flat``, whose
parameters are the tuples' fields (``*caches, *workspace, *weights``): the engine calls these
in-process, passing its buffers as separate arguments, so a step unpacks no tuple (SmolLM2: 260
``tuple_getitem`` VM calls a step; each VM call is host time the GPU waits for, while passing an
argument costs a fraction of one). Over RPC the tuple entries stay (a remote tensor argument
cannot be viewed: see ``AddTupledBufferEntries``). All take the wrapper's ``num_input``: the
weights' static types are not checked at every step.

Runs right after ``AddTupledBufferEntries``; a no-op where the helpers or the tuple entries are
missing (a ``kv_cache="copy"`` build, or decoders whose inputs are not the engine's three).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..convention import (ADVANCE_TOKENS, DECODE, DECODE_CHAIN, DECODE_PADDED, DECODERS,
                          GREEDY_TOKEN, PADDED_INPUTS, PAST_LEN, PREFILL, PREFILL_CHAIN,
                          PREFILL_FILL, PREFILL_LAST,
                          STEP_INPUTS, STEP_TOKEN_IDS, WRITES_AT_POSITION_ATTR, flat, step,
                          step_decoder, tupled)
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
    """Add ``prefill_step``, ``decode_step`` and ``decode_chain`` and their ``_flat`` variants
    (see the module doc) for the decoders that have ``<name>_tupled`` entries, when the step
    helpers are in the module."""

    def __init__(self, decoders=DECODERS):
        self.decoders = tuple(decoders)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = {gv.name_hint: gv for gv in mod.get_global_vars()}
        if not all(h in names for h in (STEP_TOKEN_IDS, STEP_INPUTS, GREEDY_TOKEN)):
            return mod
        todo = [d for d in self.decoders if tupled(step_decoder(d, names)) in names]
        if not todo:
            return mod
        bb = relax.BlockBuilder(mod)
        for name in todo:
            self._entry(bb, names, name, step(name))
            if name == PREFILL:
                self._entry(bb, names, name, PREFILL_CHAIN)
            if name == DECODE:
                self._entry(bb, names, name, DECODE_CHAIN)
                if WRITES_AT_POSITION_ATTR in (mod[names[DECODE]].attrs or {}) \
                        and all(h in names for h in (PADDED_INPUTS, ADVANCE_TOKENS)):
                    self._entry(bb, names, name, DECODE_PADDED)
        return bb.get()

    @staticmethod
    def _entry(bb, names, name: str, entry: str, tuple_form: bool = True) -> None:
        """``entry`` (the buffers as the wrapper takes them; not with ``tuple_form=False``) and
        ``<entry>_flat`` (each tuple's fields as parameters of their own, passed to the wrapper
        as tuples made here), over decoder ``name``'s tuple wrapper."""
        # prefill_last's for prefill, prefill_fill's for prefill_chain
        wrapper = names[tupled(step_decoder(name, names, fill=entry == PREFILL_CHAIN))]
        func = bb.get()[wrapper]
        # the tuple arguments (caches, workspace, weights) as the wrapper takes them, fresh vars
        buffers = [relax.Var(p.name, p.ty) for p in buffer_params(func)]
        # the wrapper's static weights are not checked at every step (its "num_input")
        weights = len(func.params) - int(func.attrs.get("num_input", len(func.params)))
        checked = len(buffers) - weights if weights else None
        if tuple_form:
            _add_step(bb, names, wrapper, entry, buffers, buffers, checked)
        flat_params, args, flat_checked = [], [], 0
        for i, b in enumerate(buffers):
            # the checked buffers (caches, workspace) by ndim and dtype: one check_tensor_info
            # each and no match_shape of their lengths, which the step does not read (its views
            # are checked against the buffers' sizes when they are made)
            unshaped = checked is not None and i < checked
            fields = [relax.Var(f"{b.name}_{j}", _unshaped(ty) if unshaped else ty)
                      for j, ty in enumerate(b.ty.fields)] \
                if isinstance(b.ty, relax.TupleType) else [relax.Var(b.name, b.ty)]
            flat_params += fields
            args.append(relax.Tuple(fields) if isinstance(b.ty, relax.TupleType) else fields[0])
            flat_checked += len(fields) if unshaped else 0
        _add_step(bb, names, wrapper, flat(entry), flat_params, args,
                  None if checked is None else flat_checked)


def _unshaped(ty):
    return relax.TensorType(ndim=ty.ndim, dtype=ty.dtype) if isinstance(ty, relax.TensorType) \
        else ty


def _add_step(bb, names, wrapper, entry: str, buffers: list, args: list,
              checked: int | None) -> None:
    """``entry`` (``prefill_step``, ``prefill_chain``, ``decode_step``, ``decode_chain``...
    or their ``_flat``): the step over ``buffers`` (its parameters after the step's token and
    integers), which reach the tuple ``wrapper`` as ``args``; VMShapeLower checks the first
    ``checked`` buffers and, of the others (the weights), only those with symbolic dims (None:
    checks all)."""
    prefill_chain = entry.startswith(PREFILL_CHAIN)
    prefill = entry.startswith(step(PREFILL)) or prefill_chain
    chain = entry.startswith(DECODE_CHAIN)
    padded = entry.startswith(DECODE_PADDED)
    func = bb.get()[wrapper]
    attrs = {"global_symbol": entry}
    if "relax.force_pure" in func.attrs:
        attrs["relax.force_pure"] = func.attrs["relax.force_pure"]
    if prefill:
        m = tirx.Var("m", "int64")
        ids = relax.Var("ids", relax.TensorType([1, m], "int64"))
        shape, (p, r) = shape_param("step", [PAST_LEN, "real"])
        params = [ids, shape, *buffers]
    elif chain:
        token = relax.Var("token", relax.TensorType([1], "int64"))
        shape, (p,) = shape_param("step", [PAST_LEN])
        params = [token, shape, *buffers]
        m = r = tirx.IntImm("int64", 1)
    elif padded:
        tokens = relax.Var("tokens", relax.TensorType([tirx.Var("n", "int64")], "int64"))
        position = relax.Var("position", relax.TensorType([1], "int64"))
        shape, (p,) = shape_param("step", [PAST_LEN])
        params = [tokens, position, shape, *buffers]
        m = r = tirx.IntImm("int64", 1)
    else:
        shape, (t, p) = shape_param("step", ["token", PAST_LEN])
        params = [shape, *buffers]
        m = r = tirx.IntImm("int64", 1)
    if checked is not None:
        attrs["num_input"] = len(params) - len(buffers) + checked
    with bb.function(entry, params, attrs=attrs, pure=bool(func.is_pure)):
        if chain:  # a view of the token tensor (LowerRuntimeBuiltin: vm.builtin.reshape)
            ids = bb.emit(relax.op.reshape(token, [1, 1]))
        elif not prefill and not padded:
            ids = bb.emit(relax.Call(names[STEP_TOKEN_IDS], [relax.ShapeExpr([t])]))
        if padded:  # ids, mask and positions from the device buffers
            inputs = bb.emit(relax.Call(names[PADDED_INPUTS],
                                        [tokens, position, relax.ShapeExpr([p])]))
            ids, mask, pos = (bb.emit(relax.TupleGetItem(inputs, i)) for i in range(3))
        else:
            inputs = bb.emit(relax.Call(names[STEP_INPUTS], [relax.ShapeExpr([p, r, m])]))
            mask, pos = (bb.emit(relax.TupleGetItem(inputs, i)) for i in range(2))
        out = bb.emit(relax.Call(wrapper, [ids, mask, pos, relax.ShapeExpr([p]), *args]))
        if wrapper.name_hint == tupled(PREFILL_FILL):  # the cache writes: nothing to read
            bb.emit_func_output(out)
            return
        logits = bb.emit(relax.TupleGetItem(out, 0)) \
            if isinstance(out.ty, relax.TupleType) else out
        # the last real row: prefill_last's only row
        row = 0 if wrapper.name_hint == tupled(PREFILL_LAST) else r - 1
        token = bb.emit(relax.Call(names[GREEDY_TOKEN], [logits, relax.ShapeExpr([row])]))
        if padded:  # recorded on the device: tokens[position + 1] = token, position += 1
            bb.emit(relax.Call(names[ADVANCE_TOKENS], [tokens, position, token]))
        if chain or padded or prefill_chain:  # left on the device for the next step
            bb.emit_func_output(token)
            return
        # (past RemovePurityChecking: the builtin is called directly, not call_pure_packed)
        shape = bb.emit(relax.Call(relax.ExternFunc("vm.builtin.tensor_to_shape"), [token],
                                   ty_args=[relax.ShapeType(ndim=1)]))
        k = tirx.Var("next_token", "int64")
        bb.match_cast(shape, relax.ShapeType([k]))
        bb.emit_func_output(relax.prim_value(k))
