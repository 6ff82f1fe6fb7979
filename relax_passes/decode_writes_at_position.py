"""DecodeWritesAtPosition: decode's new K/V row goes to the cache slot its position gives, read on
the device.

After ``InplaceKVCache`` (and ``FuseKVAppend``) a decode step writes its K/V row at the offset
``past_len`` -- a host integer, passed to the kernel as a scalar argument::

    kv_append(cache_k, cache_v, k, v, cos, sin, past_seq, ...)       # row past_seq

so every step's kernels differ in an argument, and a recorded step (a CUDA graph) could only
replay the context length it was recorded at. This pass makes ``decode``'s writes take the row
from its ``positions`` input instead, a ``(1, 1)`` int64 tensor on the device::

    kv_append_at(cache_k, cache_v, k, v, cos, sin, positions, ...)  # row positions[0, 0]

For the engine's calls nothing changes: it feeds ``positions = [[past_len]]``. What it allows is a
step on a context *padded* to a bucket: ``past_len`` (the keys' extent, the mask's length) set to
the bucket, the real position in ``positions``, the mask 1 on the keys up to it and 0 after
(``decode_padded``: ``relax_passes/add_step_entries.py``). The keys in the padding are masked
like a padded prompt's, so the step's result is the unpadded step's; and every step of a bucket
is the same call with the same arguments, which a CUDA graph can replay (``Engine``).

The rewritten kernel reads the row from ``positions`` inside the kernel (no host read), so its
host-side ``pos + n <= cache_len`` check cannot stay: the row is clamped to the cache instead,
and the bound is checked where ``past_len`` is (the cache views ``decode`` makes are checked
against the cache's size by the VM, and the engine checks a session's length first).

Only ``decode`` (one new token) is rewritten, and only when its first three inputs are the
engine's ids, mask and positions (``add_step_helpers.step_interface``), it reads the mask (a
padded key must be masked), and it has no ring caches
(a sliding-window layer's ring writes at ``position mod window`` in its own kernel); prefill keeps
its scalar offset. A rewritten ``decode`` carries the attribute ``WRITES_AT_POSITION_ATTR``.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, tirx
from tvm.script import from_source

from ..convention import DECODE, KV_CACHE_ATTR, KV_WINDOW_ATTR, PAST_LEN, WRITES_AT_POSITION_ATTR
from .add_step_helpers import step_interface

INPLACE = "relax.call_tir_inplace"
MASK_INPUT, POSITIONS_INPUT = 1, 2  # the engine's (ids, mask, positions, past_len, ...)


def read_offset_from_positions(func: tirx.PrimFunc, offset: str) -> tirx.PrimFunc | None:
    """``func`` (one of tvm_lite's K/V write kernels, which check ``assert offset + n <=
    cache_len`` on the host first) with its scalar parameter ``offset`` replaced by
    ``positions[0, 0]`` of a ``(1, 1)`` int64 buffer parameter in its place, clamped to ``[0,
    cache_len - n]``, and the host assert dropped; None if ``func`` is not of that form.

    Rewritten on the function's TVMScript text, re-parsed without the blocks' read/write regions
    so that the parser derives them again (they now read ``positions``)."""
    text = func.script()
    word = re.compile(rf"\b{re.escape(offset)}\b")
    signature = re.compile(rf"\b{re.escape(offset)}: T\.int64\b")
    check = re.compile(rf"^\s*assert {re.escape(offset)} \+ (.+?) <= (\w+), .*$", re.M)
    found = check.findall(text)
    if len(signature.findall(text)) != 1 or len(found) != 1:
        return None
    rows, cache_len = found[0]
    text = signature.sub('positions: T.Buffer((1, 1), "int64")', check.sub("", text))
    lines = [line for line in text.splitlines()
             if not line.strip().startswith(("T.reads(", "T.writes("))]
    row = f"T.max(T.min(positions[0, 0], {cache_len} - ({rows})), T.int64(0))"
    body = "\n".join(lines)
    head, sep, rest = body.partition('positions: T.Buffer((1, 1), "int64")')
    return from_source(head + sep + word.sub(row, rest))


def _uses(func: relax.Function, var: relax.Var) -> bool:
    """Whether ``func``'s body reads ``var``."""
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if e.same_as(var) else None)
    return bool(found)


def _offset_param(func: tirx.PrimFunc, call_args, past_seq) -> int | None:
    """The index of ``func``'s scalar parameter the call passes ``past_seq`` to, if exactly one."""
    hits = [i for i, (p, a) in enumerate(zip(func.params, call_args))
            if isinstance(p.ty, tvm.ir.PrimType) and a.same_as(past_seq)]
    return hits[0] if len(hits) == 1 else None


@tvm.transform.module_pass(opt_level=0, name="DecodeWritesAtPosition")
class DecodeWritesAtPosition:
    """Rewrite ``decode``'s in-place K/V writes to take their row from ``positions`` (module doc);
    a no-op for a module without such a ``decode``."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        gvs = {gv.name_hint: gv for gv in mod.get_global_vars()}
        if DECODE not in gvs:
            return mod
        func = mod[gvs[DECODE]]
        attrs = func.attrs or {}
        if KV_CACHE_ATTR not in attrs or step_interface(func) is None \
                or any(int(w) for w in attrs.get(KV_WINDOW_ATTR, ()) or ()):
            return mod
        if not _uses(func, func.params[MASK_INPUT]):  # padded keys would not be masked
            return mod
        past_len = next(p for p in func.params if p.name == PAST_LEN)
        (past_seq,) = past_len.ty.values
        positions = func.params[POSITIONS_INPUT]
        rewritten: dict = {}  # kernel -> (its "_at" variant, the offset's argument index)
        kept: list = []  # in-place calls still given past_len: then decode is left as it was

        @relax.expr_functor.mutator
        class Rewriter(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if not (isinstance(call.op, tvm.ir.Op) and call.op.name == INPLACE):
                    return call
                gv, args = call.args[0], list(call.args[1].fields)
                kernel = mod[gv] if isinstance(gv, tvm.ir.GlobalVar) else None
                if not isinstance(kernel, tirx.PrimFunc):
                    return call
                if gv not in rewritten:
                    index = _offset_param(kernel, args, past_seq)
                    at = None if index is None \
                        else read_offset_from_positions(kernel, kernel.params[index].name)
                    if at is None:  # an in-place write at past_len this pass cannot move
                        kept.extend(a for a in args if a.same_as(past_seq))
                        return call
                    rewritten[gv] = (self.builder_.add_func(at, gv.name_hint + "_at"), index)
                new_gv, index = rewritten[gv]
                args[index] = positions
                return relax.Call(call.op, [new_gv, relax.Tuple(args), *call.args[2:]],
                                  call.attrs, call.ty_args)

        rewriter = Rewriter(mod)
        body = rewriter.visit_expr(func)
        if not rewritten or kept:  # all of decode's writes move, or none
            return mod
        body = body.with_attr(WRITES_AT_POSITION_ATTR, True)
        rewriter.builder_.update_func(gvs[DECODE], body)
        return rewriter.builder_.get()
