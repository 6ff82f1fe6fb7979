"""LegalizeGroupedReshape: reshapes with symbolic dims as injective kernels FuseOps can fuse.

LegalizeOps lowers ``reshape`` through one flat index: with a symbolic dim that index is a chain
of ``//`` and ``%`` by symbolic extents (``(h * (T + 1) + t) // (T + 1) % 9 // 3``) that
AnnotateTIROpPattern cannot prove injective, so the kernel is marked opaque (``op_pattern`` 8)
and FuseOps fuses nothing into or out of it; RewriteDataflowReshape does not recognise it as a
view either, so it stays a copy kernel. In the exported decoders this is the grouped-query
attention merge ``(1, KV, G, T, D) -> (1, KV*G, T, D)`` of both K and V in every layer (and the
head split ``(1, n, H*D) -> (1, n, H, D)`` in prefill).

Most reshapes in a decoder only merge or split groups of adjacent *static* dims while every
symbolic dim stays alone in its group. This pass legalizes exactly those reshapes itself, before
LegalizeOps, as ``out[..] = x[..]`` with the index mapped group by group (static strides only),
marked injective (``op_pattern`` 2): FuseOps then folds them into their producer or consumer.
Any other reshape is left to LegalizeOps.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from ._fusion import INJECTIVE, placeholder, prim_func, run_on_functions, static_shape


def _groups(src, dst, analyzer):
    """Pairs of index lists ``([src dims], [dst dims])`` with equal products, where every
    symbolic dim is alone in a group matched to an equal dim; None if there is no such split."""
    i = j = 0
    groups = []

    def static(d):
        return isinstance(d, tirx.IntImm)

    while i < len(src) or j < len(dst):
        # size-1 dims can join any group: give them their own
        if i < len(src) and static(src[i]) and int(src[i]) == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and static(dst[j]) and int(dst[j]) == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        if not static(src[i]) or not static(dst[j]):
            if static(src[i]) or static(dst[j]) or not analyzer.can_prove_equal(src[i], dst[j]):
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        gi, gj, pi, pj = [i], [j], int(src[i]), int(dst[j])
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(src) or not static(src[i]):
                    return None
                pi *= int(src[i])
                gi.append(i)
                i += 1
            else:
                if j >= len(dst) or not static(dst[j]):
                    return None
                pj *= int(dst[j])
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _kernel(x, out_shape, groups):
    src = static_shape(x)
    tx = placeholder(x, "x")

    def body(*o):
        idx = [tirx.IntImm("int64", 0)] * len(src)
        for gi, gj in groups:
            if not gi:
                continue
            if len(gi) == 1 and len(gj) == 1:
                idx[gi[0]] = o[gj[0]]
                continue
            flat = tirx.IntImm("int64", 0)
            for j in gj:
                flat = flat * out_shape[j] + o[j]
            for i in reversed(gi):
                idx[i] = tirx.floormod(flat, src[i])
                flat = tirx.floordiv(flat, src[i])
        return tx(*idx)

    out = te.compute(out_shape, body, name="T_reshape")
    return prim_func([tx, out], "reshape", INJECTIVE)


def _match(rw, binding, _var2val):
    call = binding.value
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.reshape"):
        return None
    x = call.args[0]
    src, dst = static_shape(x), static_shape(binding.var)
    if src is None or dst is None or all(isinstance(d, tirx.IntImm) for d in src + dst):
        return None  # static reshapes legalize (and become views) fine already
    groups = _groups(src, dst, rw.analyzer)
    if groups is None or all(len(gi) <= 1 and len(gj) <= 1 for gi, gj in groups):
        return None  # unsplittable, or only size-1 dims added/removed (expand_dims-like: fine)
    x = rw.visit_expr(x)
    gv = rw.add_kernel(_kernel(x, dst, groups), "reshape")
    return relax.call_tir(gv, [x], binding.var.ty)


@tvm.transform.module_pass(opt_level=0, name="LegalizeGroupedReshape")
class LegalizeGroupedReshape:
    """Symbolic-shape reshapes that merge/split static dim groups -> injective kernels (see the
    module doc). ``self.count`` is the number of reshapes legalized by the last run."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = run_on_functions(mod, _match)
        return mod

