"""InplaceKVCache: write the new K/V rows into one preallocated cache per layer; read a view of it.

A torch-exported "decoder with past" takes every layer's past keys and values as inputs, appends the
new rows with a ``concat`` on the sequence axis, feeds the result to attention and returns it as a
``present`` output; the caller then passes the presents back as the next step's pasts. Per step that
copies the whole cache once (past -> present) and keeps two instances alive.

This pass rewrites that pattern, found by structure (not by names), into Transformer-Lite's cache:

    before:  present = concat([past, new], axis=seq)         # past: (1, H, past_seq, D) input
             ... attention(present) ...;  return (logits, ..., present, ...)

    after:   written = call_tir_inplace(kv_write, [cache, new], pos=past_seq)   # rows [pos, pos+seq)
             valid   = memory.view(written, (past_seq + seq, H, D))              # no copy: a prefix
             present = expand_dims(permute_dims(valid), 0)  # (1, H, past_seq + seq, D), as before
             return (logits,)

``cache`` is a ``(cache_len, H, D)`` input: the sequence axis comes first, so rows ``[0, n)`` are one
contiguous prefix and the view costs nothing. ``cache_len`` is symbolic, so the caller picks
``max_context`` when it allocates the caches. The layout change back to the exported
``(1, H, T, D)`` is an index permutation that FuseOps folds into attention's first consumer (the
grouped-query broadcast in the exports of SmolLM2), so no kernel copies the cache.

The rewritten ``main`` is called as

    main(*decoder_inputs, past_len: R.Shape([past_seq]), *caches, *weights) -> (logits,)

where ``caches`` are in the order of the past inputs they replace (``tvm_lite.kv_cache_names``) and
``past_len`` gives the write offset. ``kv_write`` asserts ``past_seq + seq <= cache_len`` before it
writes, so an overlong call fails with an error instead of writing past the buffer.

With ``windows`` (one sliding window per layer, 0 for a global layer) the decoders also carry
``tvm_lite.kv_windows``: each cache's window, in the order of the cache names (the layer of a cache
is the number in its name, ``past_key_values.<layer>.key``, else its position // 2). The caches
stay full length here; ``FuseAttention`` turns a window layer's cache into a ring of ``window``
rows where its attention becomes the ring kernel.

The pass refuses a model whose past inputs are not used exactly this way (e.g. a sliding window that
slices the past first), naming the input; ``tvm_lite.build(..., kv_cache="copy")`` keeps the
exported past/present interface for those.
"""

from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import from_source
from tvm_lite.errors import UserError

from ..convention import KV_CACHE_ATTR, KV_WINDOW_ATTR


@tvm_ffi.register_error  # keeps its type when raised inside the pass pipeline
class KVCacheRewriteError(UserError):
    """The model's past/present pattern is not the one this pass rewrites; the message says why."""


@tvm_ffi.register_error
class NoKVCacheError(KVCacheRewriteError):
    """The module has no past/present concat at all (not a decoder with past)."""


def _kv_write_func(dtype: str, past_shape, seq_axis: int):
    """TIR: ``cache[pos + s, *rest] = new[...s at seq_axis...]`` after a bounds check.

    ``past_shape`` is the exported past input's shape; the cache drops its leading batch axis (of
    size 1) and puts the sequence axis first.
    """
    rank = len(past_shape)
    # drop the batch axis (a leading 1) only: a single kv head keeps its axis, as the engine's
    # (max_context, kv_heads, head_dim) caches have it
    rest = [i for i in range(rank) if i != seq_axis and not (i == 0 and _is_one(past_shape[i]))]
    cache_shape = ["cache_len"] + [str(int(past_shape[i])) for i in rest]
    new_shape = ["n" if i == seq_axis else str(int(past_shape[i])) for i in range(rank)]
    loop_vars = ["s"] + [f"a{i}" for i in rest]
    new_index = ["vs" if i == seq_axis else (f"va{i}" if i in rest else "0") for i in range(rank)]
    block_vars = ["vs"] + [f"va{i}" for i in rest]
    src = f'''
@T.prim_func(private=True, s_tir=True)
def kv_write(var_cache: T.handle, var_new: T.handle, pos: T.int64):
    T.func_attr({{"tir.noalias": True}})
    cache_len = T.int64()
    n = T.int64()
    cache = T.match_buffer(var_cache, ({", ".join(cache_shape)},), "{dtype}")
    new = T.match_buffer(var_new, ({", ".join(new_shape)},), "{dtype}")
    assert pos + n <= cache_len, "KV cache overflow: past_len + seq exceeds the cache's max_context"
    for {", ".join(loop_vars)} in T.grid(n, {", ".join(cache_shape[1:])}):
        with T.sblock("kv_write"):
            {", ".join(block_vars)} = T.axis.remap("{"S" * len(block_vars)}", [{", ".join(loop_vars)}])
            cache[pos + vs, {", ".join(block_vars[1:])}] = new[{", ".join(new_index)}]
'''
    return from_source(src), rest


def _is_one(dim) -> bool:
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def _shape(expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, func):
        super().__init__(mod)
        self.func = func
        # a module from tvm_lite.from_onnx (or TVM's importer) says which params are inputs;
        # one written by hand has none: every param is a candidate past
        has_num_input = func.attrs is not None and "num_input" in func.attrs
        self.num_input = int(func.attrs["num_input"]) if has_num_input else len(func.params)
        self.inputs = list(func.params[: self.num_input])
        self.candidates = {p: i for i, p in enumerate(self.inputs)}
        self.caches: dict = {}  # past param -> (cache var, seq axis, kept axes)
        self.past_seq = None
        self.write_funcs: dict = {}
        self.cache_len = tirx.Var("cache_len", "int64")  # one max_context for every cache
        self.replaced: dict = {}  # concat var (old) -> past param

    # -- the pattern ------------------------------------------------------------------------------
    def _match_concat(self, call):
        """(past param, new rows, seq axis) if ``call`` is concat([past input, new]) on the past's
        symbolic sequence axis, else None."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.concat"):
            return None
        fields = call.args[0]
        if not isinstance(fields, relax.Tuple) or len(fields.fields) != 2:
            return None
        past, new = fields.fields
        if past not in self.candidates:
            return None
        shape = _shape(past)
        if shape is None:
            return None
        axis = int(call.attrs.axis) % len(shape)
        dim = shape[axis]
        if not isinstance(dim, tirx.Var):
            return None
        return past, new, axis

    def visit_call_(self, call):
        match = self._match_concat(call)
        call = self.visit_expr_post_order(call)
        if match is None:
            return call
        past, _, axis = match
        new = call.args[0].fields[1]
        shape = _shape(past)
        if past in self.caches:
            raise KVCacheRewriteError(f"past input '{past.name}' is concatenated twice")
        if self.past_seq is None:
            self.past_seq = shape[axis]
        elif not self.past_seq.same_as(shape[axis]):
            raise KVCacheRewriteError(
                f"past input '{past.name}' has sequence dim {shape[axis]}, others {self.past_seq}")
        dtype = str(past.ty.dtype)
        key = (dtype, tuple(str(d) for d in shape), axis)
        if key not in self.write_funcs:
            prim, rest = _kv_write_func(dtype, shape, axis)
            gvar = self.builder_.add_func(prim, "kv_write")
            self.write_funcs[key] = (gvar, rest)
        gvar, rest = self.write_funcs[key]
        cache_ty = relax.TensorType([self.cache_len] + [shape[i] for i in rest], dtype)
        name = past.name.replace("past_key_values", "cache") if "past_key_values" in past.name \
            else "cache_" + past.name.removeprefix("past_")
        cache = relax.Var(name, cache_ty)
        self.caches[past] = cache
        written = self.builder_.emit(relax.call_tir_inplace(
            gvar, relax.Tuple([cache, new, relax.prim_value(self.past_seq)]), inplace_indices=[0],
            out_ty=cache_ty))
        total = _shape(call)[axis]
        valid = self.builder_.emit(relax.op.memory.view(
            written, relax.ShapeExpr([total] + [shape[i] for i in rest])))
        # Back to the exported layout: seq goes to its axis, size-1 axes come back. Both are
        # injective ops that FuseOps folds into the consumer (a reshape with symbolic dims would
        # be an opaque kernel of its own: a copy).
        order = sorted([axis] + rest)
        kept_pos = {a: k for k, a in enumerate([axis] + rest)}
        permuted = self.builder_.emit(relax.op.permute_dims(valid, [kept_pos[a] for a in order]))
        ones = [i for i in range(len(shape)) if i != axis and i not in rest]
        return relax.op.expand_dims(permuted, ones) if ones else permuted


def _growing_inputs(inputs, ret: relax.Tuple) -> set:
    """Float inputs with a symbolic dim ``d`` such that a returned tensor of the same rank has a
    dim that is an expression in ``d`` (``d + seq``...): the inputs that behave like a KV past."""
    found = set()
    outputs = [_shape(f) for f in ret.fields]
    for p in inputs:
        shape = _shape(p)
        if shape is None or not str(p.ty.dtype).startswith(("float", "bfloat")):
            continue
        for d in shape:
            if not isinstance(d, tirx.Var):
                continue
            for out in outputs:
                if out is not None and len(out) == len(shape) and any(
                        not isinstance(o, tirx.Var)
                        and any(v.same_as(d) for v in tirx.analysis.undefined_vars(o))
                        for o in out):
                    found.add(p)
    return found


def _returned(func):
    """The function's return tuple (following one binding) and the blocks' var -> value map."""
    values = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                values[binding.var] = binding.value
    ret = func.body.body
    return (values.get(ret, ret) if isinstance(ret, relax.Var) else ret), values


@tvm.transform.module_pass(opt_level=0, name="InplaceKVCache")
class InplaceKVCache:
    """Rewrite past/present concats into in-place writes to one cache per layer (see the module doc).

    ``required=False`` leaves a module with no past/present pattern at all unchanged (any module
    given to ``tvm_lite.build``); a pattern it cannot rewrite is an error either way.
    """

    def __init__(self, required: bool = True, windows=None):
        self.required = required
        self.windows = tuple(windows or ())

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        try:
            return self._rewrite(mod)
        except NoKVCacheError:
            if self.required:
                raise
            return mod

    def _rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        if not any(gv.name_hint == "main" for gv in mod.get_global_vars()):
            raise NoKVCacheError("the module has no 'main' function")
        func = mod["main"]
        if not isinstance(func, relax.Function):
            raise NoKVCacheError("'main' is not a Relax function")
        ret, values = _returned(func)
        if not isinstance(ret, relax.Tuple):
            raise NoKVCacheError("main returns a single tensor: no present outputs to rewrite")

        rewriter = _Rewriter(mod, func)
        body = rewriter.visit_expr(func.body)
        num_input = rewriter.num_input
        attrs = func.attrs
        input_names = list(attrs["tvm_lite.input_names"]) if "tvm_lite.input_names" in attrs \
            else [p.name for p in rewriter.inputs]
        output_names = list(attrs["tvm_lite.output_names"]) if "tvm_lite.output_names" in attrs \
            else [f"output{i}" for i in range(len(ret.fields))]

        # Every past-like input must have been rewritten: one whose symbolic length grows into an
        # output's (a KV past), or one that has the rewritten pasts' length as a dim.
        rewritten = set(rewriter.caches)
        growing = _growing_inputs(rewriter.inputs, ret)
        if not rewritten and not growing:
            raise NoKVCacheError(
                "no concat of a past input with new rows on a symbolic sequence axis was found")
        for p, name in zip(rewriter.inputs, input_names):
            shape = _shape(p) or []
            if p not in rewritten and (p in growing or any(
                    rewriter.past_seq is not None and d.same_as(rewriter.past_seq) for d in shape)):
                raise KVCacheRewriteError(
                    f"input '{name}' {tuple(shape)} looks like a KV past (its length grows into "
                    "an output) but is not simply concatenated with new rows on its sequence axis "
                    "(sliding window? quantized cache?); build with kv_cache='copy'")

        # Drop the presents: every returned concat of a rewritten past.
        concat_of = {}
        for var, value in values.items():
            match = rewriter._match_concat(value) if isinstance(value, relax.Call) else None
            if match is not None:
                concat_of[var] = match[0]
        keep, dropped = [], []
        for i, field in enumerate(ret.fields):
            if isinstance(field, relax.Var) and field in concat_of:
                dropped.append(concat_of[field])
            else:
                keep.append(i)
        missing = [p.name for p in rewritten if p not in dropped]
        if missing:
            raise KVCacheRewriteError(f"past inputs {missing} are not returned as presents")
        kept_names = [output_names[i] for i in keep]

        body = _keep_outputs(body, keep)
        caches = [rewriter.caches[p] for p in rewriter.inputs if p in rewriter.caches]
        others = [p for p in rewriter.inputs if p not in rewriter.caches]
        past_len = relax.Var("past_len", relax.ShapeType([rewriter.past_seq]))
        params = others + [past_len] + caches + list(func.params[num_input:])
        kv_names = [n for p, n in zip(rewriter.inputs, input_names) if p in rewriter.caches]
        new_func = relax.Function(params, body, body.body.ty, func.is_pure, func.attrs, func.span)
        new_func = new_func.with_attrs({
            "num_input": len(others) + 1 + len(caches),
            "tvm_lite.input_names": [n for p, n in zip(rewriter.inputs, input_names)
                                     if p not in rewriter.caches] + ["past_len"] + kv_names,
            "tvm_lite.output_names": kept_names,
            KV_CACHE_ATTR: kv_names,
        })
        if any(self.windows):
            new_func = new_func.with_attr(KV_WINDOW_ATTR, _cache_windows(kv_names, self.windows))
        out = rewriter.builder_.get()
        out["main"] = new_func
        return out


def _cache_windows(names: list, windows: tuple) -> list:
    """The window of each cache (module doc: its layer from its name, else its position)."""
    out = []
    for i, name in enumerate(names):
        found = re.search(r"\.(\d+)\.", name)
        layer = int(found.group(1)) if found else i // 2
        if layer >= len(windows):
            raise KVCacheRewriteError(f"kv_windows gives {len(windows)} layers; cache '{name}' "
                                      f"is layer {layer}")
        out.append(int(windows[layer]))
    return out


def _keep_outputs(body: relax.SeqExpr, keep: list) -> relax.SeqExpr:
    """``body`` returning only the fields ``keep`` of its return tuple."""
    ret_var = body.body
    new_ret = ret_var
    blocks = []
    for block in body.blocks:
        bindings = []
        for b in block.bindings:
            if b.var.same_as(ret_var) and isinstance(b, relax.VarBinding) \
                    and isinstance(b.value, relax.Tuple):
                fields = [b.value.fields[i] for i in keep]
                new_ret = relax.Var(ret_var.name, relax.TupleType([f.ty for f in fields]))
                b = relax.VarBinding(new_ret, relax.Tuple(fields))
            bindings.append(b)
        blocks.append(type(block)(bindings))
    if new_ret.same_as(ret_var):
        raise KVCacheRewriteError("main's return tuple is not bound in its last block")
    return relax.SeqExpr(blocks, new_ret)
