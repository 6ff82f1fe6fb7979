"""AddTupledBufferEntries: entry points that take the in-place caches, workspaces and weights as
tuples.

Why: over TVM RPC a remote function gets its tensor arguments as raw ``DLTensor*``, not as
``ffi.Tensor`` objects, and the in-place decoders read their caches and workspace buffers through
``R.memory.view`` (``runtime.TVMTensorCreateView``), which needs the objects: called with remote
tensors, ``prefill``/``decode`` fail with *"Expected `ffi.Tensor` but got `DLTensor*`"*. An object a
remote function *returns* (a tuple) stays on the server and crosses the link as a handle: passed
back, the server gets the object itself, and the tensors inside it are real ``ffi.Tensor`` objects.

So this pass adds, for each planned decoder function ``f`` (``prefill``, ``decode``):

    f_tupled(*inputs, past_len, kv_caches: R.Tuple(cache_0, ...), [workspace: R.Tuple(ws_0, ...)],
             params: R.Tuple(w_0, ...))
        = f(*inputs, past_len, kv_caches[0], ..., workspace[0], ..., params[0], ...)

a thin wrapper whose body is one ``TupleGetItem`` per buffer and weight and one call of ``f``
(inside the VM: the objects reach ``f`` as they are, nothing is copied), and three allocators that
the caller runs on the server, whose results it keeps as handles and passes to the wrappers:

    alloc_kv_caches(cache_len: R.Shape([c])) -> R.Tuple(R.Tensor((c, *rest_i), dtype_i) ...)
    alloc_workspace(sizes: R.Shape([s_0, ..., s_{K-1}])) -> R.Tuple(R.Tensor((s_i,), "uint8") ...)
    alloc_params() -> R.Tuple(R.Tensor(shape_i, dtype_i) ...)      # empty, the weights' types

The weights go in one tuple for speed rather than correctness (a weight is only read, so a raw
``DLTensor*`` would do): every argument of a remote call is marshalled through the socket at every
call, and a model has hundreds of weights (SmolLM2: 214) against a handful of other arguments. The
caller fills ``alloc_params()``'s tensors once (reading them with ``ffi.ArrayGetItem``, one upload
each) and then passes the one tuple at every step. The weights must have static shapes (they do
after import); if one does not, or the decoders' weights differ in type, the wrappers take the
weights as separate arguments as before and no ``alloc_params`` is added (callers check for it).

``K`` is the most workspace buffers a function has (``PlanSymbolicArena``); every wrapper takes the
same ``K``-tuple and unpacks the first buffers its function has, as the engine shares one set of
buffers between prefill and decode. A module without a planned workspace gets no workspace tuple
and no ``alloc_workspace``. The local (non-RPC) path keeps calling ``f`` with its buffers as
separate arguments; the wrappers cost nothing there.

Runs in the VM-lowering phase, right after memory planning (the workspace inputs exist then) and
before ``LowerAllocTensor`` (which lowers the allocators' ``R.builtin.alloc_tensor``).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.utils import copy_with_new_vars

from ..convention import (ALLOC_KV_CACHES, ALLOC_PARAMS, ALLOC_WORKSPACE, KV_CACHE_ATTR, PAST_LEN,
                          TUPLED_SUFFIX, WORKSPACE_PREFIX, tupled)


def _layout(func: relax.Function, kv_attr: str):
    """(inputs before the caches, caches, workspaces, weights) params of a planned decoder."""
    num_caches = len(func.attrs[kv_attr])
    params = list(func.params)
    names = [p.name for p in params]
    if PAST_LEN not in names:
        raise ValueError(f"AddTupledBufferEntries: {func.attrs.get('global_symbol')} has no "
                         "past_len input (not an in-place decoder)")
    first_cache = names.index(PAST_LEN) + 1
    caches = params[first_cache:first_cache + num_caches]
    rest = params[first_cache + num_caches:]
    workspaces = [p for p in rest if p.name.startswith(WORKSPACE_PREFIX)]
    if rest[:len(workspaces)] != workspaces:
        raise ValueError("AddTupledBufferEntries: workspace inputs must follow the caches")
    return params[:first_cache], caches, workspaces, rest[len(workspaces):]


def _static_weight_types(layouts) -> list | None:
    """The weights' tensor types if every decoder has the same, all of static shape; else None."""
    per_func = [[w.ty for w in lay[3]] for lay in layouts]
    first = per_func[0]
    for ty in first:
        if not isinstance(ty, relax.TensorType) or ty.shape is None \
                or not isinstance(ty.shape, relax.ShapeExpr) \
                or not all(isinstance(d, tirx.IntImm) for d in ty.shape.values):
            return None
    key = [[(str(t.dtype), [int(d) for d in t.shape.values]) for t in tys] for tys in per_func]
    return first if all(k == key[0] for k in key) else None


def _cache_shape(ty: relax.TensorType, cache_len) -> list:
    dims = list(ty.shape.values)
    for d in dims[1:]:
        if not isinstance(d, tirx.IntImm):
            raise ValueError(f"AddTupledBufferEntries: cache type {ty} has a symbolic dim after "
                             "the sequence axis")
    # a ring cache (a sliding-window layer's: FuseAttention) has its static window rows
    return [dims[0] if isinstance(dims[0], tirx.IntImm) else cache_len] + dims[1:]


@tvm.transform.module_pass(opt_level=0, name="AddTupledBufferEntries")
class AddTupledBufferEntries:
    """Add ``<f>_tupled``, ``alloc_kv_caches``, ``alloc_workspace`` and ``alloc_params`` (see the
    module doc) for the Relax functions that have the attribute ``kv_attr`` (the in-place
    decoders)."""

    def __init__(self, kv_attr: str = KV_CACHE_ATTR):
        self.kv_attr = kv_attr

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        targets = [(gv, f) for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and self.kv_attr in (f.attrs or {})
                   and not gv.name_hint.endswith(TUPLED_SUFFIX)]
        if not targets:
            return mod
        layouts = {gv: _layout(f, self.kv_attr) for gv, f in targets}
        cache_types = [[(str(c.ty.dtype), [str(d) for d in c.ty.shape.values[1:]]) for c in lay[1]]
                       for lay in layouts.values()]
        if any(t != cache_types[0] for t in cache_types):
            raise ValueError("AddTupledBufferEntries: the decoders' caches differ in type")
        num_workspace = max(len(lay[2]) for lay in layouts.values())
        weight_types = _static_weight_types(list(layouts.values()))

        # the decoders are added again: add_func gives their GlobalVars the function type that a
        # call needs (a GlobalVar made by ``mod["prefill"] = f`` has none)
        names = {gv.name_hint for gv, _ in targets}
        bb = relax.BlockBuilder(tvm.IRModule(
            {gv: f for gv, f in mod.functions_items() if gv.name_hint not in names},
            attrs=mod.attrs))
        for gv, func in targets:
            typed = bb.add_func(func, gv.name_hint)
            assert typed.name_hint == gv.name_hint, (typed.name_hint, gv.name_hint)
            self._wrap(bb, typed, func, num_workspace, weight_types is not None)
        self._alloc_kv(bb, layouts[targets[0][0]][1])
        if num_workspace:
            self._alloc_workspace(bb, num_workspace)
        if weight_types is not None:
            self._alloc_params(bb, weight_types)
        return bb.get()

    def _wrap(self, bb, gv, func, num_workspace: int, tuple_weights: bool) -> None:
        # fresh Vars and symbolic dims: no binding site is shared with ``func``
        inputs, caches, workspaces, weights = _layout(copy_with_new_vars(func), self.kv_attr)
        kv = relax.Var("kv_caches", relax.TupleType([c.ty for c in caches]))
        params = [*inputs, kv]
        ws = None
        if num_workspace:
            extra = [relax.TensorType(ndim=1, dtype="uint8")] * (num_workspace - len(workspaces))
            ws = relax.Var("workspace", relax.TupleType([w.ty for w in workspaces] + extra))
            params.append(ws)
        # TVM's "num_input": VMShapeLower checks the parameters after the inputs (the weights) only
        # where they have symbolic dims: a static weight is not checked at every call
        # (VMShapeLower needs each such weight's shape: a tensor type without one is always checked)
        attrs = {"global_symbol": tupled(gv.name_hint)}
        if all(isinstance(w.ty, relax.TensorType) and isinstance(w.ty.shape, relax.ShapeExpr)
               for w in weights):
            attrs["num_input"] = len(params)
        if tuple_weights:
            packed = relax.Var("params", relax.TupleType([w.ty for w in weights]))
            params.append(packed)
        else:
            params += weights
        if "relax.force_pure" in func.attrs:
            attrs["relax.force_pure"] = func.attrs["relax.force_pure"]
        with bb.function(tupled(gv.name_hint), params, attrs=attrs, pure=bool(func.is_pure)):
            fields = [bb.emit(relax.TupleGetItem(kv, i)) for i in range(len(caches))]
            fields += [bb.emit(relax.TupleGetItem(ws, i)) for i in range(len(workspaces))]
            if tuple_weights:
                weights = [bb.emit(relax.TupleGetItem(packed, i)) for i in range(len(weights))]
            out = bb.emit(relax.Call(gv, [*inputs, *fields, *weights]))
            bb.emit_func_output(out)

    @staticmethod
    def _alloc_kv(bb, caches) -> None:
        cache_len = tirx.Var("cache_len", "int64")
        shape = relax.Var("cache_len", relax.ShapeType([cache_len]))
        with bb.function(ALLOC_KV_CACHES, [shape], attrs={"global_symbol": ALLOC_KV_CACHES}):
            tensors = [bb.emit(relax.op.builtin.alloc_tensor(
                relax.ShapeExpr(_cache_shape(c.ty, cache_len)), str(c.ty.dtype), 0))
                for c in caches]
            bb.emit_func_output(bb.emit(relax.Tuple(tensors)))

    @staticmethod
    def _alloc_workspace(bb, count: int) -> None:
        sizes = [tirx.Var(f"workspace_{i}_bytes", "int64") for i in range(count)]
        shape = relax.Var("sizes", relax.ShapeType(sizes))
        with bb.function(ALLOC_WORKSPACE, [shape], attrs={"global_symbol": ALLOC_WORKSPACE}):
            tensors = [bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([s]), "uint8", 0))
                       for s in sizes]
            bb.emit_func_output(bb.emit(relax.Tuple(tensors)))

    @staticmethod
    def _alloc_params(bb, weight_types) -> None:
        with bb.function(ALLOC_PARAMS, [], attrs={"global_symbol": ALLOC_PARAMS}):
            tensors = [bb.emit(relax.op.builtin.alloc_tensor(
                relax.ShapeExpr(list(ty.shape.values)), str(ty.dtype), 0)) for ty in weight_types]
            bb.emit_func_output(bb.emit(relax.Tuple(tensors)))
