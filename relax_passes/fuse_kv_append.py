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

The layer's query rotary goes into the same kernel when it shares K's ``cos``/``sin`` and head
size and comes after K's write (its source computed before)::

    (ck', cv', q) = call_tir_inplace(kv_append, (..., pos, q_proj), inplace_indices=[0, 1, -1])

the loop then runs over ``H + KV`` rows of heads: the first ``H`` rotate Q into the new
``(1, H, n, D)`` output, the others write K and V -- one launch where there were two.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import from_source

from ._fusion import last_axis_slice, run_on_functions, static_shape

INPLACE = "relax.call_tir_inplace"
# The kernel's loop runs over (row, head, half ``j``, column ``d`` in the half): column
# ``j D/2 + d`` is ``x[j D/2 + d] cos + (2j - 1) x[(1 - j) D/2 + d] sin``, its rotate-half partner
# found by the sign, not a select. Without it the loop runs over (row, head, column) and picks
# the partner per column (``if_then_else(vd < D/2, ...)``), a per-lane select that keeps the
# GPU's vector rules (``schedules/gpu_elementwise.py``) off the kernel, so DLight's Fallback
# gives it one 2-byte element a thread. (Prefill on an H100: Llama-1B's kv_append --
# Q, K and V of 2,048 tokens, ~25 MB moved -- takes 24.7 us a layer, ~34% of copy bandwidth;
# SmolLM2's 9 us a layer is 5% of its 2048-token prefill's GPU time.) With it every access
# moves along ``d`` and no select depends on it: 16-byte vectors (``GPUKVAppendHalves``).
# On an H100 (thirty-first session, ``python -m tvm_lite.profile --shapes smollm2-135m
# --prompt-len 2048 --chunk 256 --switch pair:relax_passes.fuse_kv_append.PAIRED_HALVES=True``,
# ``results/issue16_profile_smollm2_paired_halves_h100_s31.json``): SmolLM2's kv_append 8.9 ->
# 3.3 us a layer in one call of 2,048 tokens (266.6 -> 99.0 us of the call), 2.14 -> 1.70 us a
# layer in 256-token chunks; the call's GPU time 5.53 -> 5.38 ms. On; the GPU's logits checked
# against the build without it by ``test_kv_append_in_paired_halves_runs_correctly_on_a_cuda_gpu``.
PAIRED_HALVES = True


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


def _angle_of(expr, op: str, var2val):
    """``(angle, head_axis_added, cast)`` if ``expr`` is ``op(angle)`` (``relax.cos``/``sin``)
    under an optional cast and an optional ``expand_dims`` of the head axis, else None."""
    added, cast = False, None
    for _ in range(3):
        x = var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr
        if _op(x, "relax.expand_dims") and not added and [int(a) for a in x.attrs.axis] == [1]:
            added, expr = True, x.args[0]
        elif _op(x, "relax.astype") and cast is None:
            cast, expr = str(x.attrs.dtype), x.args[0]
        elif _op(x, op) and isinstance(x.args[0], relax.Var):
            return x.args[0], added, cast
        else:
            return None
    return None


class _Rotation:
    """Where the rotation's ``cos``/``sin`` come from: the two tensors, or -- when they are
    ``cos(a)`` and ``sin(a)`` of one angle tensor (HF's ``emb``, behind a cast and/or the head
    axis' ``expand_dims``) of static shape (a decode step's one row) -- ``a`` itself: the kernel
    computes them, so no cos and sin kernels run before it. Where the rows are symbolic (a
    prefill) the kernel reads the two tensors: they are computed once a step for every layer,
    where computing them in the kernel would take a cosine and a sine for every element of
    every head of every layer (SmolLM2 on the CPU, 256 tokens: 484 us a layer's kv_append, 3.8%
    of the prefill, when it computed them)."""

    def __init__(self, cos, sin, var2val):
        self.cos, self.sin, self.angle = cos, sin, None
        c, s = _angle_of(cos, "relax.cos", var2val), _angle_of(sin, "relax.sin", var2val)
        if c is not None and s is not None and c[0].same_as(s[0]) and c[1:] == s[1:]:
            shape = static_shape(c[0])
            if shape is not None and len(shape) == (3 if c[1] else 4) \
                    and all(isinstance(d, tirx.IntImm) for d in shape):
                self.angle, self.head_axis_added, self.cast = c

    def exprs(self) -> list:
        return [self.angle] if self.angle is not None else [self.cos, self.sin]

    def params(self) -> str:
        return "var_ang: T.handle" if self.angle is not None \
            else "var_cos: T.handle, var_sin: T.handle"

    def decls(self, dtype: str, shape) -> str:
        if self.angle is not None:
            return (f'    ang = T.match_buffer(var_ang, ({shape(static_shape(self.angle))},), '
                    f'"{self.angle.ty.dtype}")\n')
        cos, sin = (shape(static_shape(t)) for t in (self.cos, self.sin))
        return (f'    cos = T.match_buffer(var_cos, ({cos},), "{dtype}")\n'
                f'    sin = T.match_buffer(var_sin, ({sin},), "{dtype}")\n')

    def at(self, h: str, d: str = "vd") -> tuple[str, str]:
        """TIR text of cos and sin for head ``h``, row ``vs``, column ``d``."""
        at = ["0", h, "vs", d]
        if self.angle is None:
            return (f"cos[{_bcast(static_shape(self.cos), at)}]",
                    f"sin[{_bcast(static_shape(self.sin), at)}]")
        names = at[:1] + at[2:] if self.head_axis_added else at
        a = f"ang[{_bcast(static_shape(self.angle), names)}]"
        if self.cast:
            return f'T.Cast("{self.cast}", T.cos({a}))', f'T.Cast("{self.cast}", T.sin({a}))'
        return f"T.cos({a})", f"T.sin({a})"


def _rotated(src: _Source, buf: str, d_head: int, h: str, cos: str, sin: str) -> str:
    """TIR text of row ``vs``, head ``h``, column ``vd`` of ``buf`` (laid out as ``src``) rotated
    (rotate_half) by ``cos``/``sin``."""
    half = d_head // 2
    at = lambda d: src.index(d_head, h, "vs", d)  # noqa: E731
    return (f"{buf}[{at('vd')}] * {cos} + T.if_then_else(vd < {half}, "
            f"-{buf}[{at(f'vd + {half}')}], {buf}[{at(f'vd - {half}')}]) * {sin}")


def _rotated_half_of(src: _Source, buf: str, d_head: int, h: str, rotation: _Rotation,
                     dtype: str) -> str:
    """TIR text of column ``vj * D/2 + vd`` (``vj``: which half) of row ``vs``, head ``h`` of
    ``buf`` rotated (rotate_half; see :data:`PAIRED_HALVES`): the partner column is the other
    half's ``vd``, its sign ``2 vj - 1`` -- no select."""
    half = d_head // 2
    col, partner = f"vj * {half} + vd", f"(1 - vj) * {half} + vd"
    cos, sin = rotation.at(h, col)
    return (f"{buf}[{src.index(d_head, h, 'vs', col)}] * {cos} + "
            f"T.Cast(\"{dtype}\", vj * 2 - 1) * {buf}[{src.index(d_head, h, 'vs', partner)}]"
            f" * {sin}")


def _kernel(dtype, heads, d_head, k_src, v_src, rotation: _Rotation, q_src=None, q_heads=0):
    """``kv_append``; with ``q_src`` it also rotates the ``q_heads`` query heads into a third
    output ``(1, q_heads, n, D)``: one loop over ``q_heads + heads`` rows of heads, the first
    ``q_heads`` rotating Q, the others writing K and V (one kernel on a GPU)."""
    ksh, vsh = static_shape(k_src.expr), static_shape(v_src.expr)
    qsh = static_shape(q_src.expr) if q_src is not None else []
    dims = {_dim(d) for sh in [ksh, vsh, qsh, *map(static_shape, rotation.exprs())] for d in sh}
    seq = "n" if "n" in dims else str(int((ksh[1] if k_src.layout == "bs(hd)" else ksh[2])))
    n_decl = "    n = T.int64()\n" if "n" in dims else ""
    shape = lambda sh: ", ".join(_dim(d) for d in sh)  # noqa: E731

    half = d_head // 2
    paired = PAIRED_HALVES and d_head % 2 == 0
    # the loop nest: (row, head, column), or with the halves (row, head, half, column in half)
    extents, iters, col = [seq, "{}", d_head], ["s", "r", "d"], "vd"
    if paired:
        extents, iters, col = [seq, "{}", 2, half], ["s", "r", "j", "d"], f"vj * {half} + vd"

    halves_attr = ', "tvm_lite.halves": True' if paired else ""

    def rotated(src, buf, h):
        if paired:
            return _rotated_half_of(src, buf, d_head, h, rotation, dtype)
        return _rotated(src, buf, d_head, h, *rotation.at(h))

    def kv_rows(h: str, indent: str) -> str:
        return (f"ck[pos + vs, {h}, {col}] = {rotated(k_src, 'k', h)}\n{indent}"
                f"cv[pos + vs, {h}, {col}] = v[{v_src.index(d_head, h, 'vs', col)}]")

    def q_row(h: str) -> str:
        return f"qo[0, {h}, vs, {col}] = {rotated(q_src, 'q', h)}"

    q_param, q_decl, rows, body = "", "", heads, kv_rows("vr", " " * 12)
    if q_src is not None:
        q_param = ", var_q: T.handle, var_qo: T.handle"
        q_decl = (f'''    q = T.match_buffer(var_q, ({shape(qsh)},), "{dtype}")
    qo = T.match_buffer(var_qo, (1, {q_heads}, {seq}, {d_head}), "{dtype}")
''')
        rows = q_heads + heads
        vq, vh = f"T.min(vr, {q_heads - 1})", f"T.max(vr - {q_heads}, 0)"  # (in bounds)
        body = f'''if vr < {q_heads}:
                {q_row(vq)}
            else:
                {kv_rows(vh, " " * 16)}'''
    src = f'''
@T.prim_func(private=True, s_tir=True)
def kv_append(var_ck: T.handle, var_cv: T.handle, var_k: T.handle, var_v: T.handle,
              {rotation.params()}, pos: T.int64{q_param}):
    T.func_attr({{"tir.noalias": True, "tvm_lite.fused": "kv_append"{halves_attr}}})
    cache_len = T.int64()
{n_decl}    ck = T.match_buffer(var_ck, (cache_len, {heads}, {d_head}), "{dtype}")
    cv = T.match_buffer(var_cv, (cache_len, {heads}, {d_head}), "{dtype}")
    k = T.match_buffer(var_k, ({shape(ksh)},), "{dtype}")
    v = T.match_buffer(var_v, ({shape(vsh)},), "{dtype}")
{rotation.decls(dtype, shape)}{q_decl}    assert pos + {seq} <= cache_len, \\
        "KV cache overflow: past_len + seq exceeds the cache's max_context"
    for {", ".join(iters)} in T.grid({", ".join(map(str, extents)).format(rows)}):
        with T.sblock("kv_append"):
            {", ".join("v" + i for i in iters)} = T.axis.remap("{"S" * len(iters)}",
                                                               [{", ".join(iters)}])
            {body}
'''
    return from_source(src)


def _find_pairs(mod, func):
    """K write var -> (V write binding, K source, V source, rotation, query rotary or None)
    for each fusable pair."""
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
                    pairs[kb.var] = (vb, ksrc, vsrc, _Rotation(cos, sin, var2val),
                                     _query_rotary(mod, block, i, rot, cos, sin, var2val, order))
                    used.update((j, j2))
                break
    return pairs


def _query_rotary(mod, block, k_write: int, k_rot, cos, sin, var2val, order):
    """``(binding, source, heads)`` of the query's rotary that shares the K rotary's ``cos``/``sin``
    and head size and comes after the K write (its rows are then written by ``kv_append`` too),
    with its source defined before the write; else None."""
    kx = static_shape(k_rot.args[1].fields[0])
    for b in block.bindings[k_write + 1:]:
        val = b.value
        if not _op(val, "relax.call_tir") or val.same_as(k_rot):
            continue
        f = _callee(mod, val)
        if f is None or f.attrs is None or str(f.attrs.get("tvm_lite.fused", "")) != "rotary":
            continue
        x, c, s = val.args[1].fields
        if not (c.same_as(cos) and s.same_as(sin)):
            continue
        qx = static_shape(x)
        if qx is None or len(qx) != 4 or kx is None or len(kx) != 4 \
                or not isinstance(qx[1], tirx.IntImm) \
                or not tvm_ffi.structural_equal(qx[2:], kx[2:]) \
                or str(x.ty.dtype) != str(k_rot.args[1].fields[0].ty.dtype):
            continue
        src = _Source(x, var2val)
        if isinstance(src.expr, relax.Var) and src.expr in order and order[src.expr] >= k_write:
            continue
        return b, src, int(qx[1])
    return None


@tvm.transform.module_pass(opt_level=0, name="FuseKVAppend")
class FuseKVAppend:
    """A layer's rotary-K and V cache writes -> one ``kv_append`` kernel (see the module doc).
    ``self.count`` is the number of K/V pairs fused by the last run."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pairs, tails, queries = {}, {}, {}
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                found = _find_pairs(mod, func)
                pairs.update(found)
                tails.update({vb.var: k for k, (vb, *_) in found.items()})
                queries.update({q[0].var: k for k, (*_, q) in found.items() if q is not None})
        if not pairs:
            self.count = 0
            return mod
        fused_of = {}

        def match(rw, binding, _var2val):
            var = binding.var
            if var in pairs:
                vb, ksrc, vsrc, rotation, query = pairs[var]
                cache, _, pos = binding.value.args[1].fields
                vcache = vb.value.args[1].fields[0]
                cshape = static_shape(cache)
                heads, d_head = int(cshape[1]), int(cshape[2])
                qsrc, qheads = (query[1], query[2]) if query is not None else (None, 0)
                prim = _kernel(str(cache.ty.dtype), heads, d_head, ksrc, vsrc, rotation,
                               qsrc, qheads)
                gv = rw.add_kernel(prim, "kv_append")
                args = [rw.visit_expr(e)
                        for e in (cache, vcache, ksrc.expr, vsrc.expr, *rotation.exprs())]
                args.append(pos)
                out_ty, inplace = [cache.ty, vcache.ty], [0, 1]
                if query is not None:
                    args.append(rw.visit_expr(qsrc.expr))
                    out_ty.append(query[0].var.ty)
                    inplace.append(-1)
                fused = rw.builder_.emit(relax.call_tir_inplace(
                    gv, relax.Tuple(args), inplace_indices=inplace, out_ty=out_ty), "kv_append")
                fused_of[vb.var] = fused_of[var] = fused
                return relax.TupleGetItem(fused, 0)
            if var in tails and var in fused_of:
                return relax.TupleGetItem(fused_of[var], 1)
            if var in queries and queries[var] in fused_of:
                return relax.TupleGetItem(fused_of[queries[var]], 2)
            return None

        mod, _ = run_on_functions(mod, match)
        self.count = len({id(f) for f in fused_of.values()})  # kv_append kernels emitted
        return mod
