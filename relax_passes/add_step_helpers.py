"""AddStepHelpers: the small device functions a generation step needs besides the model.

A greedy step of an in-place decoder needs, besides the model itself, its three int64 inputs
(the ids, the attention mask, the positions) and the argmax of the last real row of the logits.
Made on the host, they cost a step four transfers: three uploads and the logits row back
(SmolLM2: 49,152 logits; over TVM RPC each transfer is a round trip, and copies run at tens of
MB/s through TVM's RPC even on loopback). Made on the device from a few integers, they cost
nothing to move, and the one number a step really returns is the token.

This pass adds three Relax functions, written with Relax ops so that the pipeline legalizes and
schedules their kernels like the model's own (no per-target code here). Their integers come in
shapes (a Relax ``R.Prim`` argument binds no symbolic dim; an ``R.Shape`` does):

    step_token_ids(token: R.Shape([t])) -> R.Tensor((1, 1), "int64")                   # [[t]]
    step_inputs(sizes: R.Shape([p, r, m]))
        -> (mask: R.Tensor((1, p + m), "int64"), positions: R.Tensor((1, m), "int64"))
    greedy_token(logits: R.Tensor((1, n, vocab)), row: R.Shape([i])) -> R.Tensor((1,), "int64")

and, for ``decode_padded`` (``AddStepEntries``; a step whose token and position live in device
buffers, over a context padded to a bucket: what a CUDA graph replays)::

    padded_step_inputs(tokens: R.Tensor((T,), "int64"), position: R.Tensor((1,), "int64"),
                       sizes: R.Shape([p])) -> (ids [[tokens[position]]], mask (1, p + 1):
                       1 up to position, positions [[position]])
    advance_tokens(tokens, position, token) -> (tokens, position)   # in place: tokens[position
                                                                     # + 1] = token, position += 1

``step_inputs`` is what the engine builds on the host otherwise: mask 1 for the ``p`` cached and
the ``r`` real new tokens and 0 for the ``m - r`` padding after them, positions ``p .. p + m - 1``.
``greedy_token`` is ``argmax(logits[0, i])`` (numpy's tie-break: the first index of the max) as
two reductions of TOPI's (index, value) pairs: the row in up to 128 slices of at least 1,024
logits, each slice's argmax side by side (a workgroup each on a GPU:
``schedules/gpu_scalar_reduction.py``; TVM lowers the two-value cross-thread reduction), then the
argmax of the slices' maxima. One workgroup over the whole row took 80-88 us on an H200 for the
128k-256k vocabularies of Llama-3 and Gemma.

``AddStepEntries`` (VM-lowering phase) composes them with the decoders into ``prefill_step`` /
``decode_step``. Only modules with in-place decoders (the ``kv_attr`` attribute) get the helpers,
and only when the decoders' first three inputs are the int64 ``(1, n)`` ids, ``(1, past + n)``
mask and ``(1, n)`` positions the engine feeds, then ``past_len``; the vocabulary size and the
logits dtype come from the decoders' output.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi

from tvm.script import from_source

from ..convention import (ADVANCE_TOKENS, GREEDY_TOKEN, KV_CACHE_ATTR, PADDED_INPUTS, STEP_INPUTS,
                          STEP_TOKEN_IDS)


def _logits_type(func: relax.Function) -> relax.TensorType | None:
    """The decoder's logits type ((1, n, vocab), static vocab), or None if it returns other."""
    ret = func.ret_ty
    if isinstance(ret, relax.TupleType):
        ret = ret.fields[0] if len(ret.fields) else None
    if not isinstance(ret, relax.TensorType) or ret.ndim != 3 or ret.shape is None:
        return None
    vocab = ret.shape.values[-1]
    return ret if isinstance(vocab, tirx.IntImm) else None


def step_interface(func: relax.Function) -> relax.TensorType | None:
    """The logits type of an in-place decoder the step helpers fit (the engine's int64 ids, mask
    and positions first, then ``past_len``), else None."""
    params = list(func.params)
    if len(params) < 4 or params[3].name != "past_len":
        return None
    for p in params[:3]:
        ty = p.ty
        if not isinstance(ty, relax.TensorType) or ty.ndim != 2 or str(ty.dtype) != "int64":
            return None
    return _logits_type(func)


def shape_param(name: str, dims: list[str]) -> tuple[relax.Var, list[tirx.Var]]:
    """A Relax ``R.Shape`` parameter whose dims are new int64 symbolic vars named ``dims``."""
    vars_ = [tirx.Var(d, "int64") for d in dims]
    return relax.Var(name, relax.ShapeType(vars_)), vars_


def add_token_ids(bb) -> None:
    token, (t,) = shape_param("token", ["t"])
    with bb.function(STEP_TOKEN_IDS, [token], attrs={"global_symbol": STEP_TOKEN_IDS}):
        with bb.dataflow():
            ids = bb.emit(relax.op.arange(t, t + 1, 1, "int64"))
            out = bb.emit_output(relax.op.reshape(ids, [1, 1]))
        bb.emit_func_output(out)


def add_inputs(bb) -> None:
    sizes, (p, r, m) = shape_param("sizes", ["past", "real", "padded"])
    with bb.function(STEP_INPUTS, [sizes], attrs={"global_symbol": STEP_INPUTS}):
        with bb.dataflow():
            # 1 up to p + r, then 0: one kernel of its own (ones, zeros and their concat were
            # three). Written in TE and kept out of fusion: as Relax ops (arange, less, astype)
            # each fused op would take p and m as scalars, which TVM 0.27's FuseTIR fails on.
            mask = bb.emit_te(lambda real_end: te.compute(
                (1, p + m), lambda _, j: tirx.Cast("int64", j < real_end), name="step_mask"),
                p + r, primfunc_name_hint="step_mask")
            gv = bb.lookup_binding(mask).args[0]
            bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))
            pos = bb.emit(relax.op.reshape(relax.op.arange(p, p + m, 1, "int64"), [1, m]))
            out = bb.emit_output(relax.Tuple([mask, pos]))
        bb.emit_func_output(out)


def add_padded_inputs(bb) -> None:
    """``padded_step_inputs(tokens, position, sizes: R.Shape([p]))``: ``decode_padded``'s ids
    ``[[tokens[position]]]``, mask (1 on the keys up to ``position``, 0 on the padding after, ``p
    + 1`` in all) and positions ``[[position]]``, from the device buffers alone."""
    n = tirx.Var("n", "int64")
    tokens = relax.Var("tokens", relax.TensorType([n], "int64"))
    position = relax.Var("position", relax.TensorType([1], "int64"))
    sizes, (p,) = shape_param("sizes", ["past"])
    with bb.function(PADDED_INPUTS, [tokens, position, sizes],
                     attrs={"global_symbol": PADDED_INPUTS}):
        with bb.dataflow():
            token = relax.op.take(tokens, position, axis=0, mode="clip")
            ids = bb.emit(relax.op.reshape(token, [1, 1]))
            keys = bb.emit(relax.op.arange(0, p + 1, 1, "int64"))
            mask = bb.emit(relax.op.reshape(relax.op.astype(
                relax.op.less_equal(keys, position), "int64"), [1, p + 1]))
            pos = bb.emit(relax.op.reshape(position, [1, 1]))
            out = bb.emit_output(relax.Tuple([ids, mask, pos]))
        bb.emit_func_output(out)


_ADVANCE = '''
@T.prim_func(private=True, s_tir=True)
def advance(var_tokens: T.handle, position: T.Buffer((1,), "int64"),
            token: T.Buffer((1,), "int64"), following: T.Buffer((1,), "int64")):
    T.func_attr({"tir.noalias": True})
    n = T.int64()
    tokens = T.match_buffer(var_tokens, (n,), "int64")
    for i in range(1):
        with T.sblock("advance"):
            vi = T.axis.spatial(1, i)
            if following[vi] < n:
                tokens[following[vi]] = token[vi]
            position[vi] = following[vi]
'''


def add_advance(bb) -> None:
    """``advance_tokens(tokens, position, token)``, in place: ``tokens[position + 1] = token``
    and ``position += 1`` -- one step of ``decode_padded`` recorded on the device. (The next
    position is computed first, by its own op: a kernel that read and wrote ``position`` would
    look like a reduction to the GPU schedule rules.)"""
    n = tirx.Var("n", "int64")
    tokens = relax.Var("tokens", relax.TensorType([n], "int64"))
    position = relax.Var("position", relax.TensorType([1], "int64"))
    token = relax.Var("token", relax.TensorType([1], "int64"))
    with bb.function(ADVANCE_TOKENS, [tokens, position, token],
                     attrs={"global_symbol": ADVANCE_TOKENS}):
        with bb.dataflow():
            kernel = bb.add_func(from_source(_ADVANCE), "advance")
            following = bb.emit(relax.op.add(position, relax.const(1, "int64")))
            out = bb.emit_output(relax.call_tir_inplace(
                kernel, relax.Tuple([tokens, position, token, following]), [0, 1],
                [tokens.ty, position.ty]))
        bb.emit_func_output(out)


ARGMAX_PARTS = 128  # the greedy token's first stage: this many parts of the row, one workgroup each


def _argmax_kernels(vocab: int, dtype: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc, int]:
    """The first index of the largest of ``logits[0, i, :]`` in two kernels: the row cut into
    ``parts`` slices, each slice's first argmax (side by side: one workgroup each on a GPU,
    ``schedules/gpu_scalar_reduction.py``), then the first argmax of the slices' maxima. TOPI's
    argmax (its (index, value) reducer is one TVM's cross-thread reduction knows) in both. One
    workgroup over a whole row took 80-88 us on an H200 for 128k-256k logits: one SM's reads.
    Returns the two kernels and ``parts``."""
    parts = max(1, min(ARGMAX_PARTS, vocab // 1024))
    chunk = -(-vocab // parts)
    n, i = tirx.Var("n", "int64"), tirx.Var("i", "int64")
    logits = te.placeholder((1, n, vocab), dtype, name="logits")

    def at(c, k):  # the row as (parts, chunk); the tail past the vocabulary never wins
        j = c * chunk + k
        return tirx.if_then_else(j < vocab, logits[0, i, tirx.min(j, vocab - 1)],
                                 tirx.min_value(dtype))

    rows = te.compute((parts, chunk), at, name="rows")
    local = topi.argmax(rows, axis=1)  # (parts,) int32: each slice's first argmax
    first = te.create_prim_func([logits, i, local]).without_attr("global_symbol")
    local_in = te.placeholder((parts,), str(local.dtype), name="local")
    best = te.compute((parts,), lambda c: at(c, local_in[c]), name="best")
    which = topi.argmax(best, axis=0, keepdims=True)
    token = te.compute((1,), lambda j: (which[j] * chunk + local_in[which[j]]).astype("int64"),
                       name="token")
    second = te.create_prim_func([logits, i, local_in, token]).without_attr("global_symbol")
    # (reductions, named by the caller: argmax_parts, argmax)
    return first.with_attr("op_pattern", 3), second.with_attr("op_pattern", 3), parts


def add_greedy_token(bb, vocab: int, dtype: str) -> None:
    n = tirx.Var("n", "int64")
    logits = relax.Var("logits", relax.TensorType([1, n, vocab], dtype))
    row, (i,) = shape_param("row", ["i"])
    with bb.function(GREEDY_TOKEN, [logits, row], attrs={"global_symbol": GREEDY_TOKEN}):
        with bb.dataflow():
            first, second, parts = _argmax_kernels(vocab, dtype)
            local = bb.emit(relax.call_tir(
                bb.add_func(first, "argmax_parts"), [logits, relax.prim_value(i)],
                relax.TensorType([parts], "int32")))
            out = bb.emit_output(relax.call_tir(
                bb.add_func(second, "argmax"), [logits, relax.prim_value(i), local],
                relax.TensorType([1], "int64")))
        bb.emit_func_output(out)


@tvm.transform.module_pass(opt_level=0, name="AddStepHelpers")
class AddStepHelpers:
    """Add ``step_token_ids``, ``step_inputs`` and ``greedy_token`` (see the module doc) to a
    module whose in-place decoders (attribute ``kv_attr``) fit them; otherwise a no-op."""

    def __init__(self, kv_attr: str = KV_CACHE_ATTR):
        self.kv_attr = kv_attr

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        decoders = [f for _, f in mod.functions_items()
                    if isinstance(f, relax.Function) and self.kv_attr in (f.attrs or {})]
        types = [step_interface(f) for f in decoders]
        if not decoders or any(t is None for t in types):
            return mod
        vocab = int(types[0].shape.values[-1])
        dtype = str(types[0].dtype)
        if any(int(t.shape.values[-1]) != vocab or str(t.dtype) != dtype for t in types):
            return mod
        bb = relax.BlockBuilder(mod)
        add_token_ids(bb)
        add_inputs(bb)
        add_greedy_token(bb, vocab, dtype)
        add_padded_inputs(bb)
        add_advance(bb)
        return bb.get()
