"""FuseKVAppend: one kernel writes a layer's new K (rotated) and V rows into their caches.

After ``InplaceKVCache`` and ``FuseRotary`` a layer appends to its caches like this::

    k   = permute_dims(reshape(k_proj, (1, n, H, D)), (0, 2, 1, 3))     # head split
    kr  = call_tir(rotary, (k, cos, sin))
    ck' = call_tir_inplace(kv_write, (cache_k, kr, pos))
    v   = permute_dims(reshape(v_proj, (1, n, H, D)), (0, 2, 1, 3))
    cv' = call_tir_inplace(kv_write, (cache_v, v, pos))

which runs as four kernels (rotary with the head split folded in, the V head split as a copy,
two ``kv_write``): K and V make a round trip through memory before reaching the cache. This pass
replaces the two writes (and so, after dead-code elimination, the rotary and head-split copies)
with one in-place kernel

    (ck', cv') = call_tir_inplace(kv_append, (cache_k, cache_v, k_proj, v_proj, cos, sin, pos),
                                  inplace_indices=[0, 1])

that reads the projections in their ``(1, n, H*D)`` layout, rotates K on the fly and stores both
rows in one loop nest (one launch on a GPU). Like ``kv_write`` it checks ``pos + n <= cache_len``
first. The pair must share ``pos`` and the cache shape, and V's rows must be computed before
K's write (true of both exporters); anything else is left to ``kv_write``.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import from_source

from ._fusion import last_axis_slice, run_on_functions, static_shape

INPLACE = "relax.call_tir_inplace"


def _op(expr, name):
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _callee(mod, call):
    gv = call.args[0]
    return mod[gv] if isinstance(gv, tvm.ir.GlobalVar) and gv in mod.get_global_vars() else None


def _dim(d) -> str:
    return str(int(d)) if isinstance(d, tirx.IntImm) else "n"


class _Source:
    """Where a write's rows come from: ``y (1, n, H*D)`` under a head split, else ``x (1, H, n, D)``;
    ``y`` may be columns ``[offset, offset + H*D)`` of a merged q/k/v projection (read in place)."""

    def __init__(self, new, var2val):
        self.expr, self.layout, self.offset = new, "bhsd", 0
        x = var2val.get(new, new) if isinstance(new, relax.Var) else new
        if _op(x, "relax.permute_dims") and [int(a) for a in x.attrs.axes] == [0, 2, 1, 3]:
            inner = x.args[0]
            r = var2val.get(inner, inner) if isinstance(inner, relax.Var) else inner
            if _op(r, "relax.reshape"):
                y = r.args[0]
                ys, xs = static_shape(y), static_shape(inner)
                if ys is not None and xs is not None and len(ys) == 3 and len(xs) == 4 \
                        and all(isinstance(d, tirx.IntImm) for d in (ys[2], xs[2], xs[3])) \
                        and int(ys[2]) == int(xs[2]) * int(xs[3]):
                    self.expr, self.layout = y, "bs(hd)"
                    view = last_axis_slice(var2val.get(y, y) if isinstance(y, relax.Var) else y)
                    if view is not None and view[2] - view[1] == int(ys[2]):
                        self.expr, self.offset = view[0], view[1]

    def index(self, d_head: int, h: str, s: str, d: str) -> str:
        """Index text of row ``s``, head ``h``, column ``d``."""
        if self.layout == "bs(hd)":
            return f"0, {s}, {self.offset} + {h} * {d_head} + {d}" if self.offset \
                else f"0, {s}, {h} * {d_head} + {d}"
        return f"0, {h}, {s}, {d}"


def _bcast(shape, names) -> str:
    """Index text of a tensor broadcast against ``(1, H, n, D)`` indexed by ``names``."""
    off = len(names) - len(shape)
    return ", ".join("0" if (isinstance(d, tirx.IntImm) and int(d) == 1) else names[off + i]
                     for i, d in enumerate(shape))


def _kernel(dtype, heads, d_head, k_src, v_src, cos, sin):
    ksh, vsh = static_shape(k_src.expr), static_shape(v_src.expr)
    csh, ssh = static_shape(cos), static_shape(sin)
    half = d_head // 2
    names = ["0", "vh", "vs", "vd"]
    shift_lo = k_src.index(d_head, "vh", "vs", f"vd + {half}")
    shift_hi = k_src.index(d_head, "vh", "vs", f"vd - {half}")
    dims = {_dim(d) for sh in (ksh, vsh, csh, ssh) for d in sh}
    seq = "n" if "n" in dims else str(int((ksh[1] if k_src.layout == "bs(hd)" else ksh[2])))
    n_decl = "    n = T.int64()\n" if "n" in dims else ""
    shape = lambda sh: ", ".join(_dim(d) for d in sh)  # noqa: E731
    src = f'''
@T.prim_func(private=True, s_tir=True)
def kv_append(var_ck: T.handle, var_cv: T.handle, var_k: T.handle, var_v: T.handle,
              var_cos: T.handle, var_sin: T.handle, pos: T.int64):
    T.func_attr({{"tir.noalias": True, "tvm_lite.fused": "kv_append"}})
    cache_len = T.int64()
{n_decl}    ck = T.match_buffer(var_ck, (cache_len, {heads}, {d_head}), "{dtype}")
    cv = T.match_buffer(var_cv, (cache_len, {heads}, {d_head}), "{dtype}")
    k = T.match_buffer(var_k, ({shape(ksh)},), "{dtype}")
    v = T.match_buffer(var_v, ({shape(vsh)},), "{dtype}")
    cos = T.match_buffer(var_cos, ({shape(csh)},), "{dtype}")
    sin = T.match_buffer(var_sin, ({shape(ssh)},), "{dtype}")
    assert pos + {seq} <= cache_len, "KV cache overflow: past_len + seq exceeds the cache's max_context"
    for s, h, d in T.grid({seq}, {heads}, {d_head}):
        with T.sblock("kv_append"):
            vs, vh, vd = T.axis.remap("SSS", [s, h, d])
            ck[pos + vs, vh, vd] = k[{k_src.index(d_head, "vh", "vs", "vd")}] * cos[{_bcast(csh, names)}] \\
                + T.if_then_else(vd < {half}, -k[{shift_lo}], k[{shift_hi}]) * sin[{_bcast(ssh, names)}]
            cv[pos + vs, vh, vd] = v[{v_src.index(d_head, "vh", "vs", "vd")}]
'''
    return from_source(src)


def _find_pairs(mod, func):
    """K write var -> (V write binding, K source, V source, cos, sin) for each fusable pair."""
    var2val = relax.analysis.get_var2val(func)
    pairs = {}
    for block in func.body.blocks:
        order = {b.var: i for i, b in enumerate(block.bindings)}
        writes = []
        for i, b in enumerate(block.bindings):
            val = b.value
            if not _op(val, INPLACE):
                continue
            callee = _callee(mod, val)
            if callee is None or "kv_write" not in val.args[0].name_hint:
                continue
            cache, new, pos = val.args[1].fields
            rot = var2val.get(new) if isinstance(new, relax.Var) else None
            is_rot = _op(rot, "relax.call_tir") and (f := _callee(mod, rot)) is not None \
                and f.attrs is not None and str(f.attrs.get("tvm_lite.fused", "")) == "rotary"
            writes.append((i, b, cache, new, pos, rot if is_rot else None))
        used = set()
        for j, (i, kb, kc, knew, kpos, rot) in enumerate(writes):
            if rot is None or j in used:
                continue
            for j2 in range(j + 1, len(writes)):
                i2, vb, vc, vnew, vpos, vrot = writes[j2]
                if j2 in used or vrot is not None:
                    continue
                if not tvm_ffi.structural_equal(kpos, vpos) or \
                        not tvm_ffi.structural_equal(kc.ty, vc.ty):
                    break
                ksrc = _Source(rot.args[1].fields[0], var2val)
                vsrc = _Source(vnew, var2val)
                # V's rows (and K's inputs) must exist where K's write is
                defined_before = lambda e: not isinstance(e, relax.Var) or e not in order \
                    or order[e] < i  # noqa: E731
                cos, sin = rot.args[1].fields[1], rot.args[1].fields[2]
                if all(defined_before(e) for e in (ksrc.expr, vsrc.expr, cos, sin)):
                    pairs[kb.var] = (vb, ksrc, vsrc, cos, sin)
                    used.update((j, j2))
                break
    return pairs


@tvm.transform.module_pass(opt_level=0, name="FuseKVAppend")
class FuseKVAppend:
    """A layer's rotary-K and V cache writes -> one ``kv_append`` kernel (see the module doc).
    ``self.count`` is the number of K/V pairs fused by the last run."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pairs, tails = {}, {}
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                found = _find_pairs(mod, func)
                pairs.update(found)
                tails.update({vb.var: k for k, (vb, *_) in found.items()})
        if not pairs:
            self.count = 0
            return mod
        fused_of = {}

        def match(rw, binding, _var2val):
            var = binding.var
            if var in pairs:
                vb, ksrc, vsrc, cos, sin = pairs[var]
                cache, _, pos = binding.value.args[1].fields
                vcache = vb.value.args[1].fields[0]
                cshape = static_shape(cache)
                heads, d_head = int(cshape[1]), int(cshape[2])
                prim = _kernel(str(cache.ty.dtype), heads, d_head, ksrc, vsrc, cos, sin)
                gv = rw.add_kernel(prim, "kv_append")
                args = [rw.visit_expr(e) for e in (cache, vcache, ksrc.expr, vsrc.expr, cos, sin)]
                fused = rw.builder_.emit(relax.call_tir_inplace(
                    gv, relax.Tuple(args + [pos]), inplace_indices=[0, 1],
                    out_ty=[cache.ty, vcache.ty]), "kv_append")
                fused_of[vb.var] = fused
                return relax.TupleGetItem(fused, 0)
            if var in tails and var in fused_of:
                return relax.TupleGetItem(fused_of[var], 1)
            return None

        mod, n = run_on_functions(mod, match)
        self.count = n // 2
        return mod
