"""FuseAttention: one kernel per layer for attention on the in-place KV cache (prefill and decode).

After ``InplaceKVCache`` a layer's attention reads its cache ``(cache_len, kv_heads, head_dim)``
through a view of rows ``[0, past_len + seq)`` and then, as the exporters wrote it::

    k = permute_dims(view_k, [1, 0, 2]); k = expand_dims(k, 0)            # (1, KV, T, D)
    k = reshape(broadcast_to(expand_dims(k, 2), (1, KV, G, T, D)), (1, H, T, D))   # GQA, if G > 1
    s = matmul(q, permute_dims(k, [0, 1, 3, 2]))                           # (1, H, n, T)
    s = softmax(s * scale + mask, axis=-1)                                 # (Casts around it in fp16)
    o = matmul(s, v)                                                       # v: the same chain

which runs as several kernels and materializes K and V once per *query* head plus the (H, n, T)
scores. This pass matches that subgraph with ``tvm.relax.dpl`` (both torch exporters produce it;
Casts, ``multiply``/``divide`` by the scale and either order of the mask add are accepted) and
replaces it with one ``R.call_tir`` of a tvm_lite attention PrimFunc::

    o = call_tir(attention_{prefill,decode}, [q, view_k, view_v, mask], (1, H, n, D))

The kernel reads the cache views in their own layout (query head ``h`` reads kv head ``h // G``:
no GQA copy), applies the scale and the additive mask — the export's causal + attention-mask
(padding) mask, computed once per step and shared by every layer — and an online softmax with fp32
accumulation for any input dtype. ``decode`` (``n`` bound to 1 by ``SplitPrefillDecode``) gets the
decode kernel, everything else the prefill kernel (``n`` symbolic); the PrimFuncs carry the
``tvm_lite.kernel`` attribute by which ``schedules/gpu_attention.py`` schedules them for a GPU
profile. The function emitted here is target independent: a plain loop nest, parallel over
(head, query row), which is also what the CPU runs.

Sliding-window layers get ring caches (``ring=True``; every target: the GPU rules of
``schedules/gpu_attention.py`` rebuild the ring kernels too). Where the decoder carries
``tvm_lite.kv_windows`` (``InplaceKVCache(windows=...)``) and a window layer's K/V views read the
``kv_write`` of its caches, the attention becomes :func:`ring_kernel` instead::

    (ring_k', ring_v', o) = call_tir_inplace(attention_ring_*, [q, ring_k, ring_v, new_k, new_v,
                                                                 past], inplace_indices=[1, 2, -1])

which attends over the ring and the new rows and then writes the new rows into the ring at
``position mod window``; the ``kv_write``/view become dead, and the cache parameter becomes a
``(window, KV, D)`` ring (the caller allocates ``window`` rows: ``_metadata``'s
``kv_caches.rows``). Attention before the write (not the cache's write-then-read) is what makes a
ring of ``window`` rows enough for a chunk of any length: a write first would overwrite rows the
chunk's earlier queries still see. The ring kernel masks by position (``past`` is ``kv_write``'s
write position): causal and the window, nothing else. It does not read the export's mask, so a
model whose layers are all windowed builds no mask at all (the export's mask is ``O(context)``
per step) -- ring models are never padded (``Engine``), and the exports' window masks are exactly
causal + window (``kv_pos > q_pos - W``, checked against torch by ``tvm_lite/arch_matrix.py``).

What is left unfused, with a warning naming the softmax: any attention whose K/V are not views of
the in-place cache, a softmax not over the last axis, a scale that is not a scalar constant, an
extra op between the scores and the softmax other than logit soft-capping ``c * tanh(x / c)``
(which the kernels apply), or a mask that does not broadcast to ``(1, H, n, T)``. A sliding window expressed in the mask (as the HF
exports do) is honoured, since the mask is read as given.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard
from tvm.script import from_source

from ..convention import DECODE, KV_CACHE_ATTR, KV_WINDOW_ATTR, PAST_LEN
from .inplace_kv_cache import KVCacheRewriteError

LOG = logging.getLogger("tvm_lite.fuse_attention")
KERNEL_ATTR = "tvm_lite.kernel"  # "attention_prefill" | "attention_decode" (+ "_ring_" variants)
PARAMS_ATTR = "tvm_lite.attention"  # heads, kv_heads, head_dim, dtype, scale, mask layout


# -- the kernel (target independent) ---------------------------------------------------------------
def attention_params(heads: int, kv_heads: int, head_dim: int, dtype: str, scale: float,
                     mask_dtype: str, mask_heads: bool, mask_rows: bool, decode: bool,
                     merged_heads: bool = False, kv_squeezed: bool = False,
                     softcap: float = 0.0, window: int = 0) -> dict:
    """Everything that shapes an attention kernel; stored on the PrimFunc (``PARAMS_ATTR``) for the
    schedule rules, which rebuild the kernel for their target from it."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    p = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
             scale=float(scale), mask_dtype=mask_dtype, mask_heads=bool(mask_heads),
             mask_rows=bool(mask_rows), decode=bool(decode), merged_heads=bool(merged_heads),
             kv_squeezed=bool(kv_squeezed))
    if softcap:
        p["softcap"] = float(softcap)  # (absent = none: the kernels of other models keep their key)
    if window:
        p["window"] = int(window)  # a ring cache of this many rows (ring_kernel)
    return p


def score(p: dict, dot: str, mask: str) -> str:
    """The TIR expression of one attention score (fp32) from the raw dot product ``dot`` and the
    mask element ``mask``: ``dot * scale``, soft-capped as ``c * tanh(x / c)`` (Gemma 2) when the
    kernel has a ``softcap``, plus the mask. Every kernel (CPU and GPU) computes scores by it
    (or by :func:`scaled_score`, given a dot product of a pre-scaled query)."""
    return scaled_score(p, f"{dot} * T.float32({p['scale']!r})", mask)


def scaled_score(p: dict, x: str, mask: str) -> str:
    """:func:`score` of an already scaled dot product ``x``."""
    if p.get("softcap"):
        c = p["softcap"]
        x = f"T.float32({c!r}) * T.tanh({x} * T.float32({1.0 / c!r}))"
    return f"{x} + T.float32({mask})"


def signature(p: dict) -> tuple[str, str]:
    """(buffer declarations, n) of an attention PrimFunc: ``q (1, H, n, D)``, ``k, v (m, KV,
    D)``, ``mask (1, 1|H, 1|n, m)``, ``out`` (``(1, H, n, D)``, or ``(1, n, H * D)`` with
    ``merged_heads``: the layout the output projection reads, so no transpose kernel follows).

    A ring kernel's (``window`` in ``p``: :func:`ring_kernel`) has no mask: ``k, v`` are the ring
    ``(W, KV, D)``, ``nk, nv (1, KV, n, D)`` the call's new rows and ``past`` (a scalar parameter)
    the tokens before them; ``ring_rows = min(past, W - 1)`` (the ring rows any query of the call
    can see) and ``m = ring_rows + n`` (its keys: those ring rows, oldest first, then the new
    rows; see :func:`ring_key`) are names the body may use (:func:`kernel_source` substitutes
    them: a let at the top of a GPU kernel's function does not reach the host's launch code)."""
    n = "1" if p["decode"] else "n"
    H, KV, D = p["heads"], p["kv_heads"], p["head_dim"]
    rows = p.get("window") or "m"
    kv_shape = f"({rows}, {D})" if p.get("kv_squeezed") else f"({rows}, {KV}, {D})"
    decl = f'''
    {"" if p["decode"] else "n = T.int64()"}
    {"" if p.get("window") else "m = T.int64()"}
    q = T.match_buffer(var_q, (1, {H}, {n}, {D}), "{p["dtype"]}")
    k = T.match_buffer(var_k, {kv_shape}, "{p["dtype"]}")
    v = T.match_buffer(var_v, {kv_shape}, "{p["dtype"]}")
    o = T.match_buffer(var_o, {out_shape(p, n)}, "{p["dtype"]}")'''
    if p.get("window"):
        return decl + f'''
    nk = T.match_buffer(var_nk, (1, {KV}, {n}, {D}), "{p["dtype"]}")
    nv = T.match_buffer(var_nv, (1, {KV}, {n}, {D}), "{p["dtype"]}")''', n
    mh = H if p["mask_heads"] else 1
    mq = n if p["mask_rows"] else "1"
    return decl + f'''
    mask = T.match_buffer(var_mask, (1, {mh}, {mq}, m), "{p["mask_dtype"]}")''', n


def ring_key(p: dict, j: str) -> tuple[str, str]:
    """(ring slot, new row) of key ``j`` of a ring kernel: keys ``j < ring_rows`` are the ring's
    positions ``past - ring_rows + j`` (slot: position mod W), the others the new row ``j -
    ring_rows`` (each index clamped into its buffer, so either may be evaluated)."""
    return (f"(past - ring_rows + {j}) % {p['window']}",
            f"T.max({j} - ring_rows, T.int64(0))")


def ring_visible(p: dict, i: str, j: str) -> str:
    """Whether key ``j`` is visible to query row ``i`` (position ``past + i``): causal, and inside
    the window (a key at position ``a`` is seen by queries ``a .. a + W - 1``); "True" for a
    kernel without a window (its mask decides)."""
    if not p.get("window"):
        return "True"
    return f"({j} <= {i} + ring_rows and {j} + {p['window']} > {i} + ring_rows)"


def out_shape(p: dict, n: str) -> str:
    H, D = p["heads"], p["head_dim"]
    return f"(1, {n}, {H * D})" if p.get("merged_heads") else f"(1, {H}, {n}, {D})"


def out_index(p: dict, h: str, i: str, d: str) -> str:
    """``o[...]`` of query head ``h``, row ``i``, dim ``d``."""
    return f"o[0, {i}, ({h}) * {p['head_dim']} + {d}]" if p.get("merged_heads") \
        else f"o[0, {h}, {i}, {d}]"


def kv_index(p: dict, buf: str, j: str, kv_head: str, d: str) -> str:
    """``k[...]``/``v[...]`` of key ``j``, kv head ``kv_head``, dim ``d`` (a cache of one kv head
    has no head axis: InplaceKVCache drops size-1 axes)."""
    return f"{buf}[{j}, {d}]" if p.get("kv_squeezed") else f"{buf}[{j}, {kv_head}, {d}]"


def mask_index(p: dict, h: str, i: str, j: str) -> str:
    """``mask[...]`` for query head ``h``, query row ``i``, key ``j`` (a ring kernel has no mask:
    "0"; it masks by position, :func:`ring_visible`)."""
    if p.get("window"):
        return "0"
    return (f"mask[0, {h if p['mask_heads'] else 0}, {i if p['mask_rows'] else 0}, {j}]")


def func_attrs(p: dict) -> str:
    kind = ("attention_ring_" if p.get("window") else "attention_") \
        + ("decode" if p["decode"] else "prefill")
    return (f'{{"tirx.noalias": True, "{KERNEL_ATTR}": "{kind}", '
            f'"{PARAMS_ATTR}": {{{", ".join(f"{k!r}: {v!r}" for k, v in p.items())}}}}}')


def kernel_source(p: dict, decl: str, body: str, static: dict | None = None) -> str:
    """The TVMScript of an attention kernel: the one signature every kernel (CPU and GPU) has
    (a ring kernel's: ``q, k, v, nk, nv, past, o``), its attributes and buffer declarations
    (``decl``, from :func:`signature`), then ``body`` (statements at one level of indentation).
    ``static`` names sizes (``n``, ``m``, ``past``) made constants (tests that run a kernel's
    generated code without scalar arguments): give their values to :func:`parse`."""
    params = "var_q: T.handle, var_k: T.handle, var_v: T.handle, " + (
        "var_nk: T.handle, var_nv: T.handle, past: T.int64, " if p.get("window")
        else "var_mask: T.handle, ") + "var_o: T.handle"
    for name in static or {}:
        decl = decl.replace(f"{name} = T.int64()", "")
        params = params.replace(f"{name}: T.int64, ", "")
    if p.get("window"):  # the ring kernel's sizes (signature)
        rows = f"T.min(past, T.int64({p['window'] - 1}))"
        body = re.sub(r"\bm\b", f"({rows} + {'1' if p['decode'] else 'n'})", body)
        body = re.sub(r"\bring_rows\b", rows, body)
    return f'''
@T.prim_func(private=True)
def attention({params}):
    T.func_attr({func_attrs(p)})
    {decl}
{body}'''


def parse(src: str, static: dict | None = None, **extra_vars) -> tirx.PrimFunc:
    """The PrimFunc of a :func:`kernel_source` text (``static``: the values of its constant
    sizes)."""
    from tvm.script import tirx as T

    consts = {k: tirx.IntImm("int64", v) for k, v in (static or {}).items()}
    return from_source(src, extra_vars={"T": T, **extra_vars, **consts})


def _key_pass(p: dict, keys: int, lanes: int, start: str, count: str, k_at, v_at,
              mask_col) -> str:
    """One pass of the online softmax over keys ``[start, count)``, ``keys`` at a time
    (statements inside a kernel's per-(head, row) loop): ``k_at(j, d)``/``v_at(j, d)`` are the
    TIR texts of key ``j``'s K/V element ``d``, ``mask_col(j)`` its mask column (None: no
    mask)."""
    f32 = "T.float32"
    D = p["head_dim"]
    j = f"{start} + j0 * {keys} + jj" if start != "0" else f"j0 * {keys} + jj"
    # the lanes' partial sums folded in halves (vector adds), then the last one scalar
    fold, width = [], lanes
    while width > 1:
        width //= 2
        fold.append(f"""                for l in T.vectorized({width}):
                    part[jj, l] = part[jj, l] + part[jj, l + {width}]""")
    fold = "\n".join(fold)
    k_elem = k_at(j, f"d0 * {lanes} + l")
    mask = mask_index(p, "h", "i", mask_col(j)) if mask_col else "0"
    extent = f"{count} - ({start})" if start != "0" else count
    return f'''        for j0 in range(({extent} + {keys - 1}) // {keys}):
            for jj in range({keys}):
                for l in T.vectorized({lanes}):
                    part[jj, l] = {f32}(0)
                if {j} < {count}:
                    for d0 in range({D // lanes}):
                        for l in T.vectorized({lanes}):
                            part[jj, l] = part[jj, l] + qr[d0 * {lanes} + l] * {f32}({k_elem})
            st[2] = st[0]
            for jj in range({keys}):
{fold}
                if {j} < {count}:
                    sc[jj] = {score(p, "part[jj, 0]", mask)}
                    st[2] = T.max(st[2], sc[jj])
            if st[2] > st[0]:
                for d in T.vectorized({D}):
                    acc[d] = acc[d] * T.exp(st[0] - st[2])
                st[1] = st[1] * T.exp(st[0] - st[2])
                st[0] = st[2]
            for jj in range({keys}):
                if {j} < {count}:
                    sc[jj] = T.exp(sc[jj] - st[0])
                    st[1] = st[1] + sc[jj]
                    for d in T.vectorized({D}):
                        acc[d] = acc[d] + sc[jj] * {f32}({v_at(j, "d")})
'''


def _lanes(p: dict) -> int:
    return next(x for x in (16, 8, 4, 2, 1) if p["head_dim"] % x == 0)


def _row_loop(p: dict, keys: int, passes: str) -> str:
    """A kernel's body: per (head, query row), in parallel, q loaded, the key ``passes`` (from
    :func:`_key_pass`), then ``acc / sum`` stored."""
    _, n = signature(p)
    H, D, G = p["heads"], p["head_dim"], p["heads"] // p["kv_heads"]
    lanes = _lanes(p)
    return f'''    for hi in T.parallel({H} * {n}):
        h = hi // {n}
        i = hi % {n}
        kvh = h // {G}
        qr = T.alloc_buffer(({D},), "float32", scope="local")
        acc = T.alloc_buffer(({D},), "float32", scope="local")
        part = T.alloc_buffer(({keys}, {lanes}), "float32", scope="local")
        sc = T.alloc_buffer(({keys},), "float32", scope="local")  # scores, then probabilities
        st = T.alloc_buffer((3,), "float32", scope="local")  # running max, running sum, new max
        for d in T.vectorized({D}):
            qr[d] = T.float32(q[0, h, i, d])
            acc[d] = T.float32(0)
        st[0] = T.min_value("float32")  # a fully masked row stays finite
        st[1] = T.float32(0)
{passes}        for d in T.vectorized({D}):
            {out_index(p, "h", "i", "d")} = T.Cast("{p["dtype"]}", acc[d] / st[1])
'''


def reference_kernel(p: dict, keys: int = 8) -> tirx.PrimFunc:
    """The target-independent attention PrimFunc: per (head, query row), in parallel, one pass over
    the keys, ``keys`` at a time, with an online softmax (running max and sum, fp32), then
    ``acc / sum``. Dot products run in ``lanes`` partial sums (``keys`` independent chains) and the
    accumulator update over whole rows, as vector loops: what the CPU runs (a GPU rule replaces
    the whole function). A ``window`` in ``p`` makes it the ring kernel (:func:`ring_kernel`)."""
    if p.get("window"):
        return ring_kernel(p, keys)
    decl, _ = signature(p)
    passes = _key_pass(p, keys, _lanes(p), "0", "m", lambda j, d: kv_index(p, "k", j, "kvh", d),
                       lambda j, d: kv_index(p, "v", j, "kvh", d), lambda j: j)
    return from_source(kernel_source(p, decl, _row_loop(p, keys, passes)))


def ring_kernel(p: dict, keys: int = 8) -> tirx.PrimFunc:
    """Attention of a sliding-window layer on its ring cache, then the ring updated (the CPU
    kernel; ``schedules/gpu_attention_*.py`` rebuild it for a GPU with the same semantics).

    The ring ``k, v (W, KV, D)`` holds the positions before ``past``, position ``a`` in slot ``a
    mod W``; a query at ``past + i`` sees the keys at ``past + i - W + 1 .. past + i`` (causal, in
    the window): its last ``W - 1 - i`` ring positions and the call's new rows ``nk, nv (1, KV,
    n, D)`` from ``max(0, i - W + 1)`` to ``i``. Each query row walks exactly those (two passes
    of the online softmax with position bounds: no mask tensor, nothing outside the window read,
    so a step's cost does not grow with the context). Only after every row has read the ring are
    the call's last ``min(n, W)`` rows written into it at ``position mod W`` (earlier rows are
    outside every later query's window). One kernel, so nothing runs between the reads and the
    writes; prefill, a chunk and a decode step are the same code, and nothing is copied but the
    new rows."""
    W, KV, D = p["window"], p["kv_heads"], p["head_dim"]
    decl, n = signature(p)
    lanes = _lanes(p)
    slot = lambda j: ring_key(p, j)[0]  # noqa: E731
    zero, i = "T.int64(0)", 'T.Cast("int64", i)'
    passes = _key_pass(p, keys, lanes, f"T.max({zero}, {i} + ring_rows + 1 - {W})", "ring_rows",
                       lambda j, d: kv_index(p, "k", slot(j), "kvh", d),
                       lambda j, d: kv_index(p, "v", slot(j), "kvh", d), None)
    passes += _key_pass(p, keys, lanes, f"T.max({zero}, {i} + 1 - {W})", f"{i} + 1",
                        lambda j, d: f"nk[0, kvh, {j}, {d}]", lambda j, d: f"nv[0, kvh, {j}, {d}]",
                        None)
    rows = f"T.min({n}, {W})"
    new = f"{n} - {rows} + t // {KV}"  # the new row written; its position is past + new
    slot, h = f"(past + {new}) % {W}", f"t % {KV}"
    write = f'''    for t in T.parallel({rows} * {KV}):
        for d in T.vectorized({D}):
            {kv_index(p, "k", slot, h, "d")} = nk[0, {h}, {new}, d]
            {kv_index(p, "v", slot, h, "d")} = nv[0, {h}, {new}, d]
'''
    return parse(kernel_source(p, decl, _row_loop(p, keys, passes) + write))


# -- the pattern -------------------------------------------------------------------------------------
def _optional_cast(pat):
    return pat | is_op("relax.astype")(pat)


def _kv_chain():
    """(view pattern, the (1, H, T, D) tensor pattern, named sub-patterns) for K or V."""
    view = is_op("relax.memory.view")(wildcard(), wildcard(), wildcard(), wildcard())
    perm = is_op("relax.permute_dims")(view)
    head = is_op("relax.expand_dims")(perm)
    grouped_in = is_op("relax.expand_dims")(head)
    bcast = is_op("relax.broadcast_to")(grouped_in, wildcard())
    grouped = is_op("relax.reshape")(bcast, wildcard())
    return view, head | grouped, dict(perm=perm, head=head, grouped_in=grouped_in, bcast=bcast,
                                      grouped=grouped)


def _attention_pattern():
    q = wildcard()
    mask = wildcard()
    k_view, k_full, k_parts = _kv_chain()
    v_view, v_full, v_parts = _kv_chain()
    k_t = is_op("relax.permute_dims")(k_full)
    scores = is_op("relax.matmul")(q, k_t)
    scores_c = _optional_cast(scores)
    scale, inv_scale = is_const(), is_const()
    scaled = is_op("relax.multiply")(scores_c, scale) | is_op("relax.divide")(scores_c, inv_scale) \
        | scores_c
    # logit soft-capping (Gemma 2): c * tanh(x / c), the division written either way
    cap_in, cap_in_inv, cap_out = is_const(), is_const(), is_const()
    capped = is_op("relax.multiply")(is_op("relax.tanh")(
        is_op("relax.divide")(scaled, cap_in) | is_op("relax.multiply")(scaled, cap_in_inv)), cap_out)
    masked = is_op("relax.add")(scaled | capped, mask) | is_op("relax.add")(mask, scaled | capped)
    softmax = is_op("relax.nn.softmax")(_optional_cast(masked))
    out = is_op("relax.matmul")(_optional_cast(softmax), v_full)
    # the heads merged back for the output projection: (1, H, n, D) -> (1, n, H * D)
    merged_t = is_op("relax.permute_dims")(out)
    merged = is_op("relax.reshape")(merged_t, wildcard())
    names = dict(q=q, mask=mask, k_view=k_view, v_view=v_view, k_t=k_t, scores=scores,
                 scale=scale, inv_scale=inv_scale, cap_in=cap_in, cap_in_inv=cap_in_inv,
                 cap_out=cap_out, softmax=softmax, out=out, merged_t=merged_t,
                 merged=merged,
                 **{f"k_{k}": p for k, p in k_parts.items()},
                 **{f"v_{k}": p for k, p in v_parts.items()})
    return names


class _Refused(Exception):
    pass


def _static(shape, what):
    vals = []
    for d in shape:
        if not isinstance(d, tirx.IntImm):
            raise _Refused(f"{what} has a symbolic dim where a constant is expected: {shape}")
        vals.append(int(d))
    return vals


def _shape(expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise _Refused(f"no static-rank shape on {expr}")
    return list(ty.shape.values)


def _axes(call) -> list | None:
    return None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]


def _check_chain(m: dict, names: dict, side: str, heads: int):
    """(kv_heads, head_dim) if the K or V chain reads the view as the exporters do."""
    get = lambda key: m.get(names[f"{side}_{key}"])  # noqa: E731
    view_shape = _shape(m[names[f"{side}_view"]])
    if len(view_shape) == 3:  # (T, KV, D)
        kv, d = _static(view_shape[1:], f"{side.upper()} view")
        perm, new_axes = [1, 0, 2], [0]
    elif len(view_shape) == 2:  # (T, D): one kv head, its axis dropped by InplaceKVCache
        kv, d = 1, _static(view_shape[1:], f"{side.upper()} view")[0]
        perm, new_axes = [0, 1], [0, 1]
    else:
        raise _Refused(f"{side.upper()} view is not (T, kv_heads, head_dim)")
    if _axes(get("perm")) != perm:
        raise _Refused(f"{side.upper()} view permuted by {_axes(get('perm'))}, not {perm}")
    if [int(a) for a in get("head").attrs.axis] != new_axes:
        raise _Refused(f"{side.upper()}: unexpected expand_dims")
    if get("grouped") is not None:
        if [int(a) for a in get("grouped_in").attrs.axis] != [2]:
            raise _Refused(f"{side.upper()}: GQA broadcast not on a new axis 2")
        b = _shape(get("bcast"))
        if len(b) != 5 or _static([b[0], b[1], b[2], b[4]], "GQA broadcast") != [1, kv, heads // kv, d]:
            raise _Refused(f"{side.upper()}: GQA broadcast to {b}, expected (1, {kv}, "
                           f"{heads // kv}, T, {d})")
    elif kv != heads:
        raise _Refused(f"{side.upper()} has {kv} heads without a GQA broadcast to {heads}")
    return kv, d


class _Fuser:
    """Rewrites one function (prefill or decode); collects the PrimFuncs it needs."""

    def __init__(self, decode: bool, builder: relax.BlockBuilder, kernels: dict,
                 merged_heads: bool, rings: "_Rings | None" = None):
        self.rings = rings  # the function's window caches that may become rings
        self.decode = decode
        self.merged_heads = merged_heads
        self.builder = builder  # the module's: adds the kernels (typed GlobalVars)
        self.kernels = kernels  # params (tuple) -> GlobalVar, shared by the module
        self.fused = 0
        self.refused: list[str] = []
        self.names = _attention_pattern()
        self.pattern = self.names["merged" if merged_heads else "out"]

    def __call__(self, expr, m):
        try:
            return self._rewrite(expr, m)
        except _Refused as err:
            self.refused.append(str(err))
            return expr

    def _scalar(self, m, name) -> float:
        c = m[self.names[name]].value.numpy()
        if c.size != 1:
            raise _Refused(f"{name} is a tensor of shape {c.shape}, not a scalar")
        return float(c.reshape(()))

    def _rewrite(self, expr, m):
        names = self.names
        q, mask, out = m[names["q"]], m[names["mask"]], m[names["out"]]
        q_shape = _shape(q)
        if len(q_shape) != 4:
            raise _Refused(f"query of rank {len(q_shape)}, expected (1, H, n, D)")
        one, heads = _static(q_shape[:2], "query")
        head_dim = _static(q_shape[3:], "query")[0]
        if one != 1:
            raise _Refused("batch size is not 1")
        kv, dk = _check_chain(m, names, "k", heads)
        kv_v, dv = _check_chain(m, names, "v", heads)
        if (kv, dk) != (kv_v, dv) or dk != head_dim:
            raise _Refused(f"K/V/Q head shapes differ: K {kv}x{dk}, V {kv_v}x{dv}, Q {heads}x{head_dim}")
        if _axes(m[names["k_t"]]) != [0, 1, 3, 2]:
            raise _Refused("K is not transposed on its last two axes")
        sm = m[names["softmax"]]
        if int(sm.attrs.axis) not in (-1, 3):
            raise _Refused(f"softmax over axis {int(sm.attrs.axis)}, not the keys")
        scale = 1.0
        for which in ("scale", "inv_scale"):
            if names[which] in m:
                c = m[names[which]].value.numpy()
                if c.size != 1:
                    raise _Refused(f"scale is a tensor of shape {c.shape}, not a scalar")
                scale = float(c.reshape(())) if which == "scale" else 1.0 / float(c.reshape(()))
        softcap = 0.0
        if names["cap_out"] in m:
            c_out = self._scalar(m, "cap_out")
            c_in = self._scalar(m, "cap_in") if names["cap_in"] in m \
                else 1.0 / self._scalar(m, "cap_in_inv")
            if not np.isclose(c_in, c_out, rtol=1e-6):
                raise _Refused(f"tanh between the scores and the softmax is not a soft-cap "
                               f"c*tanh(x/c): divides by {c_in}, multiplies by {c_out}")
            softcap = c_out
        # the scores' dtype before the softmax cast is the mask add's dtype
        mshape = _shape(mask)
        mdtype = str(mask.ty.dtype)
        if len(mshape) != 4:
            raise _Refused(f"mask of rank {len(mshape)}, expected 4")
        mb, mh = _static(mshape[:2], "mask")
        n_dim, t_dim = q_shape[2], _shape(m[names["k_view"]])[0]
        analyzer = tvm.sym.Analyzer() if hasattr(tvm, "sym") else tvm.arith.Analyzer()
        if mb != 1 or mh not in (1, heads):
            raise _Refused(f"mask shape {mshape} does not broadcast to (1, {heads}, n, T)")
        if not analyzer.can_prove_equal(mshape[3], t_dim):
            raise _Refused(f"mask keys {mshape[3]} != cache rows {t_dim}")
        rows = not (isinstance(mshape[2], tirx.IntImm) and int(mshape[2]) == 1)
        if rows and not analyzer.can_prove_equal(mshape[2], n_dim):
            raise _Refused(f"mask rows {mshape[2]} != query rows {n_dim}")
        # (a mask without a row axis on a prefill -- padding only, a bidirectional model -- is
        # not causal: the GPU prefill kernels find that out from the mask and walk every key tile)
        one_row = isinstance(n_dim, tirx.IntImm) and int(n_dim) == 1
        decode = self.decode and one_row
        dtype = str(q.ty.dtype)
        if str(m[names["k_view"]].ty.dtype) != dtype:
            raise _Refused("query and cache dtypes differ")
        out_ty = relax.TensorType(q_shape, dtype)
        if self.merged_heads:
            merged = m[names["merged"]]
            want = [1, n_dim, heads * head_dim]
            got = _shape(merged)
            if _axes(m[names["merged_t"]]) != [0, 2, 1, 3] or len(got) != 3 or not all(
                    analyzer.can_prove_equal(a, b) for a, b in zip(got, want)):
                return expr  # another consumer layout: the plain pattern fuses the attention
            out, out_ty = merged, relax.TensorType(got, dtype)
        ring = self.rings.source(m[names["k_view"]], m[names["v_view"]], kv, head_dim) \
            if self.rings is not None else None
        p = attention_params(heads, kv, head_dim, dtype, scale, mdtype, mh == heads, rows, decode,
                             self.merged_heads, len(_shape(m[names["k_view"]])) == 2,
                             softcap, ring.window if ring else 0)
        key = tuple(sorted(p.items()))
        if key not in self.kernels:
            name = ("attention_ring_" if ring else "attention_") + ("decode" if decode else "prefill")
            self.kernels[key] = self.builder.add_func(reference_kernel(p), name)
        gv = self.kernels[key]
        self.fused += 1
        if ring:  # the ring kernel reads the rings and the new rows, then writes the rings
            rk, rv = self.rings.ring_var(ring.cache_k, ring.window), \
                self.rings.ring_var(ring.cache_v, ring.window)
            call = relax.TupleGetItem(relax.call_tir_inplace(
                gv, [q, rk, rv, ring.new_k, ring.new_v, ring.past], [1, 2, -1],
                [rk.ty, rv.ty, out_ty]), 2)
        else:
            call = relax.call_tir(gv, [q, m[names["k_view"]], m[names["v_view"]], mask], out_ty)
        out_dtype = str(out.ty.dtype)
        return call if out_dtype == dtype else relax.op.astype(call, out_dtype)


@dataclass
class _RingSource:
    window: int
    cache_k: relax.Var
    cache_v: relax.Var
    new_k: relax.Expr
    new_v: relax.Expr
    past: relax.Expr  # the write position (tokens before the call): a PrimValue


class _Rings:
    """A decoder's window caches (``KV_WINDOW_ATTR``) and the ring-typed parameters (``(W, KV,
    D)``) that replace them where every attention on them became the ring kernel."""

    def __init__(self, func: relax.Function):
        windows = [int(w) for w in func.attrs[KV_WINDOW_ATTR]]
        first = [p.name for p in func.params].index(PAST_LEN) + 1  # the caches follow past_len
        caches = func.params[first:first + len(windows)]
        self.windows = {c: w for c, w in zip(caches, windows) if w}
        self.vars: dict = {}  # full-length cache param -> its ring param
        self.var2val: dict = {}

    def _write(self, view):
        """(cache param, new rows, write position) if ``view`` reads a window cache's
        ``kv_write`` result."""
        written = view.args[0]
        call = self.var2val.get(written) if isinstance(written, relax.Var) else None
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and call.op.name == "relax.call_tir_inplace"
                and isinstance(call.args[1], relax.Tuple) and len(call.args[1].fields) == 3):
            return None
        cache, new, pos = call.args[1].fields
        return (cache, new, pos) if cache in self.windows else None

    def source(self, k_view, v_view, kv_heads: int, head_dim: int) -> _RingSource | None:
        k, v = self._write(k_view), self._write(v_view)
        if k is None or v is None or self.windows[k[0]] != self.windows[v[0]]:
            return None
        for new in (k[1], v[1]):
            shape = new.ty.shape.values if isinstance(new.ty, relax.TensorType) \
                and isinstance(new.ty.shape, relax.ShapeExpr) else None
            if shape is None or len(shape) != 4 or not all(
                    isinstance(d, tirx.IntImm) and int(d) == want
                    for d, want in zip((shape[0], shape[1], shape[3]), (1, kv_heads, head_dim))):
                return None  # new rows not (1, KV, n, D): the full-length cache stays
        return _RingSource(self.windows[k[0]], k[0], v[0], k[1], v[1], k[2])

    def ring_var(self, cache: relax.Var, window: int) -> relax.Var:
        if cache not in self.vars:
            dims = list(cache.ty.shape.values)
            self.vars[cache] = relax.Var(cache.name, relax.TensorType(
                [tirx.IntImm("int64", window)] + dims[1:], str(cache.ty.dtype)))
        return self.vars[cache]

    def swap(self, func: relax.Function, name: str) -> relax.Function:
        """``func`` (its dead code removed) with each cache whose attention all became the ring
        kernel as its ring parameter; a cache read both ways is an error naming it."""
        func = relax.analysis.remove_all_unused(func)
        used = set()
        relax.analysis.post_order_visit(
            func.body, lambda e: used.add(e) if isinstance(e, relax.Var) else None)
        params = []
        for p in func.params:
            ring = self.vars.get(p)
            if ring is not None and p in used:
                raise KVCacheRewriteError(f"FuseAttention: {name}: cache '{p.name}' of a sliding-window "
                                   "layer is read both by the ring kernel and by other ops; build "
                                   "with kv_windows=() (full-length caches)")
            params.append(ring if ring is not None else p)
        return relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs,
                              func.span)


def _remaining_softmax(func) -> int:
    count = [0]

    def visit(e):
        # attention scores are (1, H, n, T); a MoE router's softmax is (tokens, experts)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) \
                and e.op.name == "relax.nn.softmax" and e.args[0].ty.ndim == 4:
            count[0] += 1

    relax.analysis.post_order_visit(func, visit)
    return count[0]


@tvm.transform.module_pass(opt_level=0, name="FuseAttention")
class FuseAttention:
    """Replace each layer's attention on the in-place KV cache by one tvm_lite attention kernel
    (see the module doc). ``functions``: the Relax functions to rewrite (default: every one);
    ``decode`` gets the decode kernel. ``stats`` (after a run): function -> (fused, refused)."""

    def __init__(self, functions: tuple[str, ...] | None = None, ring: bool = False):
        self.functions = functions
        self.ring = ring  # the window layers' caches as rings (ring_kernel)
        self.stats: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels: dict = {}
        builder = relax.BlockBuilder(mod)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            if self.functions is not None and gv.name_hint not in self.functions:
                continue
            new, fused, refused = func, 0, []
            rings = _Rings(func) if self.ring and KV_WINDOW_ATTR in (func.attrs or {}) else None
            for merged_heads in (True, False):  # the longer pattern first
                fuser = _Fuser(gv.name_hint == DECODE, builder, kernels, merged_heads, rings)
                if rings is not None:
                    rings.var2val = relax.analysis.get_var2val(new)
                new = rewrite_call(fuser.pattern, fuser, new)
                fused += fuser.fused
                refused += fuser.refused
            left = _remaining_softmax(new)
            for why in sorted(set(refused)):
                LOG.warning("FuseAttention: %s: attention left unfused: %s", gv.name_hint, why)
            decoder = KV_CACHE_ATTR in (func.attrs or {})  # not an MLP's softmax
            if left and not refused and decoder:
                LOG.warning("FuseAttention: %s: %d softmax(es) not in the attention pattern on "
                            "the in-place KV cache (no cache view, or an extra op such as "
                            "soft-capping): left unfused", gv.name_hint, left)
            self.stats[gv.name_hint] = (fused, left)
            if rings is not None and rings.vars:
                new = rings.swap(new, gv.name_hint)
            if fused:
                updates[gv] = new
        if not updates:
            return mod
        out = builder.get()
        for gv, func in updates.items():
            out[gv] = func
        return relax.transform.DeadCodeElimination()(out)


def reference_numpy(q, k, v, mask, scale, groups, softcap=0.0):
    """numpy attention with the kernel's semantics (for tests): q (1,H,n,D), k/v (T,KV,D)."""
    kk = np.repeat(k.transpose(1, 0, 2), groups, axis=0).astype("float64")
    vv = np.repeat(v.transpose(1, 0, 2), groups, axis=0).astype("float64")
    s = np.einsum("hnd,htd->hnt", q[0].astype("float64"), kk) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = s + mask[0].astype("float64")
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hnt,htd->hnd", s, vv)[None]
