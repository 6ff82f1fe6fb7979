"""Decode attention on a GPU, flash-decoding style: the keys split across workgroups.

``FuseAttention`` gives each layer's decode step one ``attention_decode`` PrimFunc
(``q (1, H, 1, D)``, the cache views ``k, v (m, KV, D)`` or ``(m, D)``, the additive mask and the
output). :func:`decode_kernel` rebuilds it for a GPU profile as one PrimFunc with two kernels:

1. **split** -- grid ``(splits, KV)``: the workgroup of split ``s`` and kv head ``kvh`` reads keys
   ``[s * chunk, (s + 1) * chunk)`` of that kv head *once* for all ``G = H / KV`` query heads that
   share it. Thread ``tx = lane * DV + dv`` owns ``V`` consecutive dims (``dv``) -- one vector
   load of ``V`` elements of K or V (16 bytes on CUDA) -- of the keys ``≡ lane`` (mod ``L``).
   Per tile of ``L * R`` keys each thread writes the partial dot products of its ``V`` dims with
   the ``G`` query rows (held in registers, pre-scaled) to local memory; after a barrier each
   (key, query head) score is summed once from its ``DV`` partials (+ mask) into local memory;
   after a second barrier every thread reads the scores of its own keys, runs the online softmax
   for its key lane (running max, sum and a ``G × V`` fp32 accumulator in registers) and
   accumulates V (its loads were issued with K's, before the barriers).
   At the end the ``L`` key lanes are merged through local memory (rescaled to the split's max),
   ``GH`` query heads a round (two barriers each), and the split writes ``(max, sum, acc[G, D])``
   per query head to a global scratch buffer.
2. **merge** -- one workgroup per (query head, ``DM`` dims), ``P`` split lanes × ``DM`` threads:
   lane ``p`` folds splits ``p, p + P, ...`` with the online rescale (one pass), then the ``P``
   lanes are combined: ``out = Σ_s e^{m_s - M} acc_s / Σ_s e^{m_s - M} l_s`` with
   ``M = max_s m_s``. (At Gemma's (8, 1, 256) and 8192 keys on the H200: 8.9 µs with 64 dims ×
   4 lanes a workgroup, 3.5 µs with 32 × 16; one workgroup per query head had folded all 256
   splits in one lane.)

The number of splits follows the context: a split has at least ``min_chunk`` keys (so the scratch
partials stay small next to the K/V it summarizes: ``4 · G`` keys) and at most ``ceil(m /
max_splits)`` rounded up to whole tiles, ``max_splits · KV ≈ 4 ·`` the profile's compute units.
Scores and softmax are fp32 for any input dtype; a fully masked split contributes nothing (its
weight ``e^{m_s - M}`` is 0 beside a real key).

A sliding-window layer's ring cache (``window`` in the params: ``FuseAttention``'s ring kernel,
``k, v`` the ring of ``W`` rows, the new row ``nk, nv``, the position ``past``): a first kernel
(:func:`ring_write`) writes the new row at ``past mod W`` -- the position it overwrites,
``past - W``, is outside the window of the query at ``past`` -- and the split kernels then read
ring slots ``[0, min(past + 1, W))``: exactly the window, in any order (softmax does not care),
every key visible, so no mask. The splits cover the live window only, whatever the context.
"""

from __future__ import annotations

import math

from tvm import tirx

from ..relax_passes.fuse_attention import (kernel_source, kv_index, mask_index, out_index,
                                           parse, scaled_score, signature)
from .profiles import GPUProfile

# threads of a split workgroup per profile (multiples of head_dim / vector lanes are taken)
DECODE_THREADS = {"adreno": 128, "mali": 64, "cuda": 128, "gpu": 128}
WORKGROUPS_PER_UNIT = 4  # split workgroups per compute unit the split count aims for
MAX_KEYS_PER_THREAD = 4  # R: keys a thread handles per tile (loads in flight)
MIN_KEYS_PER_HEAD = 4  # a split has >= 4 * G keys: its partials are <= 1/4 of the K/V it reads
MERGE_THREADS = 512  # merge workgroup: DM dims x P split lanes
MERGE_SPLIT_LANES = 16
MERGE_HEADS_MAX_DIM = 64  # head_dim above which the key lanes are merged one query head a round
MERGE_DIMS = 32  # head dims per merge workgroup (a divisor of head_dim of at least 16, else all)
# splits a merge lane loads before folding them (every load of a round in flight at once). A
# lane folds splits / P of them; one a round, at 8192 keys with 2 kv heads (264 splits, P = 16)
# the merge took 2.84 of the call's 8.72 us on the H200 (``..._h200_s8.json``). Measured on the
# H200 (``python -m tvm_lite.bench.attention``, ``results/issue17_decode_attention_merge_unroll1
# _s15.json`` against ``..._merge_rounds_s15.json``): 8 a round took the calls at 8192 keys
# 0.7-0.8 us faster -- (14,2,64) 8.6 -> 7.8 us, (9,3,64) 7.6 -> 6.9, (8,1,256) 13.3 -> 12.5 --
# and left the shorter contexts within 0.2 us.
MERGE_UNROLL = 8
# Rounds of this many splits where a lane has more than MERGE_UNROLL to fold (0: off). On an H100
# (thirty-second session, results/issue17_decode_merge_h100_s32.json) rounds of 16 everywhere
# took the merge of (14, 2, 64) and (8, 1, 256) at 8192 keys -- 16 and 33 splits a lane --
# 2.77 -> 2.36 and 2.86 -> 2.46 us, and cost every shape with 8 or fewer a lane 0.2-0.3 us:
# this takes 16 only where it saves a round. Against 0 in one call (thirty-third session, H100,
# results/issue17_decode_merge_many_h100_s33.json): (14, 2, 64) at 8192 keys 8.7 -> 8.2 us
# (0.97x -> 1.02x SDPA), (8, 1, 256) 12.9 -> 12.6, no point slower; a second run with it on:
# all 15 points of the bench 1.01x-2.09x SDPA.
MERGE_UNROLL_MANY = 16
# fp32 accumulators a thread holds (G query heads x V vector lanes): V halves above this. 128
# keeps every GQA group up to 16 heads as it was (fp16: V = 8); a lower limit trades 16-byte
# loads for registers where G is large -- ptxas gives (14, 2, 64) 212 registers at V = 8, so 2
# workgroups an SM -- and is for a sweep to decide (issue 17: that shape is 0.88-0.90x SDPA).
MAX_ACCUMULATORS = 128
# ... and V halves further while G x V > FEWER_ACCUMULATORS, as long as the workgroup keeps at
# least FEWER_MIN_KEY_LANES key lanes (``threads / (D / V)``). On an H100 (twenty-sixth session,
# ``bench.attention --switch acc32:MAX_ACCUMULATORS=32``,
# ``results/issue17_decode_variants_h100_s26.json``) 32 accumulators took (14, 2, 64) from 6.1 /
# 6.5 / 8.3 us to 5.0 / 5.5 / 8.7 at 512 / 2048 / 8192 keys (V 8 -> 4: 16 -> 8 key lanes), but
# (8, 1, 256) from 8.0 / 8.6 / 12.9 to 9.8 / 10.4 / 15.9 (4 -> 2 key lanes: tiles of 8 keys).
# With the floor of 8 key lanes only (14, 2, 64) changes among the benchmarked shapes
# (``--switch few32:FEWER_ACCUMULATORS=32``, ``results/issue17_decode_fewer_h100_s26.json``):
# 6.0 / 6.5 / 8.3 -> 5.0 / 5.5 / 8.6 us (SDPA 6.2 / 5.8 / 8.4), the others within 0.1 us. On:
# 17% faster at 512 and 2048 keys, 4% slower at 8192. Measured on CUDA only; the same rule
# applies to every profile (fewer registers a thread).
FEWER_ACCUMULATORS = 32
FEWER_MIN_KEY_LANES = 8
# The split kernel's first key tile loaded with q, not after it. Without it a thread loads q
# (G x V scalar loads: 56 two-byte loads at (14, 2, 64)), scales it -- which waits for q to
# arrive -- and only then enters the tile loop and issues its K and V loads: two memory round
# trips in a row before the first product, where a short context's split (2048 keys:
# 32 splits of one 64-key tile at (14, 2, 64)) has nothing else to do. With it the first
# tile's K and V loads go out first, q follows as V-lane vector loads, and the loop loads the
# later tiles. Off until timed (``bench.attention --baseline-kernel``, a copy with it on): the
# H200 measured the split kernel at 3.0-4.4 us for any context up to 2048 keys, the merge at
# 1.5-1.7 us, and (14, 2, 64) at 2048 keys 0.90x SDPA (6.11 against 5.49 us).
FIRST_TILE_WITH_Q = False
# The tile's mask values loaded with its K and V, not after the first barrier. Without it the
# score stage (after the partial dots' barrier) issues each (key, head) score's mask load and
# waits for it: a third memory round trip in every tile's chain (q or K/V, then the mask), which
# a one-tile split (every split up to ~2048 keys) pays whole. With it each thread loads the
# ``ceil(tile * G / threads)`` mask values of the scores it will sum right after the tile's K/V
# loads, into registers, and the round trip overlaps K/V's. Off: on an H100 (twenty-first
# session, ``results/issue17_decode_mask_with_kv_h100_s21.json``, ``bench.attention --switch
# maskkv:MASK_WITH_KV=True``) it took 5 of 6 cases 0.3-0.7 us faster -- (14, 2, 64) at 2048
# keys 6.4 -> 6.2 us (SDPA 5.9), at 8192 8.2 -> 7.7 -- but (32, 8, 64) at 8192 12.0 -> 13.9 us
# (ptxas: 128 -> 165 registers, 4 -> 3 workgroups an SM, its 512 workgroups in two waves).
MASK_WITH_KV = False
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def plan(p: dict, profile: GPUProfile, max_threads: int) -> dict:
    """The decode kernel's shape for attention params ``p`` on ``profile``: vector lanes ``V``,
    threads per key ``DV``, key lanes ``L``, keys per thread per tile ``R``, the tile, the split
    bounds."""
    H, KV, D = p["heads"], p["kv_heads"], p["head_dim"]
    G = H // KV
    lanes = max(1, profile.vector_bytes // _BYTES.get(p["dtype"], 4))
    lanes = min(lanes, D)
    wanted = min(DECODE_THREADS.get(profile.name, 128), max_threads)
    while D % lanes or (G * lanes > MAX_ACCUMULATORS and lanes > 1):
        lanes //= 2
    while (G * lanes > FEWER_ACCUMULATORS and lanes > 1
           and wanted // (D // (lanes // 2)) >= FEWER_MIN_KEY_LANES):
        lanes //= 2
    dv = D // lanes
    if dv > max_threads:
        raise ValueError(f"decode attention: head_dim {D} needs {dv} threads of {lanes} lanes; "
                         f"the target allows {max_threads}")
    threads = max(dv, wanted)
    threads -= threads % dv
    key_lanes = threads // dv
    # local memory: partial dots (tile keys x DV x G, padded rows) and scores (tile keys x G)
    # per key of the tile, + the lane merge (L x D, L x G twice)
    budget = profile.local_memory_bytes - 4 * key_lanes * (D + 2 * G)
    per_r = 4 * key_lanes * (dv * G + 1 + G)
    r = max(1, min(MAX_KEYS_PER_THREAD, budget // per_r))
    tile = key_lanes * r
    # the key lanes' accumulators are summed GH query heads at a time (two barriers a round):
    # the largest divisor of G whose L x GH x D floats fit beside the tile's buffers, for head_dim
    # <= 64 (on the H200 one head a round was faster at head_dim 128:
    # results/issue17_decode_attention_sweep3_h200_s8.json)
    left = profile.local_memory_bytes - 4 * (tile * (dv * G + 1) + tile * G + 2 * key_lanes * G)
    merge_heads = max([g for g in range(1, G + 1)
                       if G % g == 0 and 4 * key_lanes * g * D <= left
                       and (g == 1 or D <= MERGE_HEADS_MAX_DIM)] + [1])
    max_splits = max(1, -(-WORKGROUPS_PER_UNIT * profile.compute_units // KV))
    min_tiles = max(1, -(-MIN_KEYS_PER_HEAD * G // tile))
    # merge: a workgroup per (query head, DM dims), P split lanes x DM threads, each lane
    # folding every P-th split (online), then the lanes combined
    merge_dims = math.gcd(D, MERGE_DIMS)
    if merge_dims < 16:
        merge_dims = D
    merge_lanes = max(1, min(MERGE_SPLIT_LANES, min(MERGE_THREADS, max_threads) // merge_dims))
    return dict(G=G, V=lanes, DV=dv, threads=threads, L=key_lanes, R=r, tile=tile,
                max_splits=max_splits, min_tiles=min_tiles, P=merge_lanes, DM=merge_dims,
                GH=merge_heads)


def ring_write(p: dict, threads: int = 128) -> str:
    """The kernel (TVMScript statements) that writes a ring kernel's last ``min(n, W)`` new rows
    into the ring at ``position mod W`` (position ``past + row``); one thread per element."""
    W, KV, D = p["window"], p["kv_heads"], p["head_dim"]
    n = "1" if p["decode"] else "n"
    rows = f"T.min({n}, T.int64({W}))"
    total = f"{rows} * {KV * D}"
    e = f"(wb * {threads} + wt)"
    row, h, d = f"{n} - {rows} + {e} // {KV * D}", f"{e} // {D} % {KV}", f"{e} % {D}"
    slot = f"(past + {row}) % {W}"
    blocks = f"({total} + {threads - 1}) // {threads}"
    return f'''    for wb in T.thread_binding({blocks}, thread="blockIdx.x"):
        for wt in T.thread_binding({threads}, thread="threadIdx.x"):
            if {e} < {total}:
                {kv_index(p, "k", slot, h, d)} = nk[0, {h}, {row}, {d}]
                {kv_index(p, "v", slot, h, d)} = nv[0, {h}, {row}, {d}]
'''


def _unroll(n: int) -> str:
    return "T.unroll" if n <= 64 else "T.serial"


def decode_kernel(p: dict, profile: GPUProfile, max_threads: int,
                  static: dict | None = None) -> tirx.PrimFunc:
    """The two-kernel split-K decode attention PrimFunc (three with a ring: the write first; see
    the module doc). ``static``: sizes made constants (``kernel_source``)."""
    decl, _ = signature(p)
    pl = plan(p, profile, max_threads)
    H, KV, D = p["heads"], p["kv_heads"], p["head_dim"]
    G, V, DV, TH, L, R, TILE = (pl[k] for k in ("G", "V", "DV", "threads", "L", "R", "tile"))
    SM, MT, P = pl["max_splits"], pl["min_tiles"], pl["P"]
    DM, GH = pl["DM"], pl["GH"]
    U, UM = MERGE_UNROLL, MERGE_UNROLL_MANY
    dim = f"dc * {DM} + tx % {DM}"  # merge: the thread's dim
    f32, dt = "T.float32", p["dtype"]
    stride = DV * G + 1  # a key's partials in local memory, padded against bank conflicts
    # chunk = keys per split (whole tiles); splits = ceil(m / chunk) <= max_splits
    chunk_tiles = f"T.max({MT}, (m + {SM * TILE - 1}) // {SM * TILE})"
    chunk = f"({chunk_tiles} * {TILE})"
    splits = f"(m + {chunk} - 1) // {chunk}"

    def merge_rounds(u_: int, pad: str) -> str:
        """The merge lane's rounds, ``u_`` splits a round: every load first, then the fold."""
        j = f"((i * {u_} + u) * {P} + tx // {DM})"  # round i's u-th split of the lane
        split_at = f"((h // {G} * {SM} + {j}) * {G} + h % {G})"  # ... and its partials' row
        return "".join(pad + line + "\n" for line in (
            f"for i in range(({splits} + {P * u_ - 1}) // {P * u_}):",
            f"    for u in T.unroll({u_}):  # the round's loads first",
            '        lm[u] = T.min_value("float32")',
            f"        ll[u] = {f32}(0)",
            f"        lo[u] = {f32}(0)",
            f"        if {j} < {splits}:",
            f"            lm[u] = part_ml[{split_at} * 2]",
            f"            ll[u] = part_ml[{split_at} * 2 + 1]",
            f"            lo[u] = part_o[{split_at} * {D} + {dim}]",
            "    w[3] = w[0]",
            f"    for u in T.unroll({u_}):",
            "        w[3] = T.max(w[3], lm[u])",
            "    w[1] = w[1] * T.exp(w[0] - w[3])",
            "    w[2] = w[2] * T.exp(w[0] - w[3])",
            f"    for u in T.unroll({u_}):  # a split past the count adds 0 (l_s = o_s = 0)",
            "        w[1] = w[1] + T.exp(lm[u] - w[3]) * lo[u]",
            "        w[2] = w[2] + T.exp(lm[u] - w[3]) * ll[u]",
            "    w[0] = w[3]"))

    pad = " " * 16
    if UM > U:  # more splits than a round of U a lane: rounds of UM (the count is the same
        # for every thread of the launch, so the branch never diverges)
        rounds = (f"{pad}if {splits} > {P * U}:\n" + merge_rounds(UM, pad + "    ")
                  + f"{pad}else:\n" + merge_rounds(U, pad + "    "))
    else:
        rounds = merge_rounds(U, pad)
    UB = max(U, UM)

    def at_key(base: str) -> tuple[str, str]:  # K's and V's element of key r of the tile at base
        key = f"T.min({base} + r * {L} + lane, m - 1)"  # clamped: out-of-split keys get p = 0
        return (kv_index(p, "k", key, "kvh", f"dv * {V} + e"),
                kv_index(p, "v", key, "kvh", f"dv * {V} + e"))
    # the score stage: pair i * TH + tx of the tile is (key pair // G, head pair % G)
    pair_key, pair_head = f"(i * {TH} + tx) // {G}", f"(i * {TH} + tx) % {G}"
    pair_mask = mask_index(p, f"kvh * {G} + {pair_head}", "0", f"T.min(base + {pair_key}, m - 1)")
    k_at, v_at = at_key("base")
    u = _unroll

    def tile_loads(k_src: str, v_src: str, indent: int) -> str:
        """The tile's K and V loads (every load issued before its use)."""
        lines = [f"for r in {u(R)}({R}):", f"    for e in T.vectorized({V}):",
                 f"        kr[r * {V} + e] = {k_src}",
                 f"for r in {u(R)}({R}):", f"    for e in T.vectorized({V}):",
                 f"        vr[r * {V} + e] = {v_src}"]
        return "\n".join(" " * indent + ln for ln in lines)

    q_at = f'q[0, kvh * {G} + g, 0, dv * {V} + e]'
    if FIRST_TILE_WITH_Q:  # the first tile's K and V, then q (raw, vector loads), then its use
        first = "\n" + tile_loads(*at_key("start"), 16) + f"""
                qh = T.alloc_buffer(({G * V},), "{dt}", scope="local")
                for g in {u(G)}({G}):
                    for e in T.vectorized({V}):
                        qh[g * {V} + e] = {q_at}"""
        q_src, loads = f"qh[g * {V} + e]", f"""                    if tl > 0:  # (the first tile's were loaded with q)
{tile_loads(k_at, v_at, 24)}"""
    else:
        first, q_src, loads = "", q_at, tile_loads(k_at, v_at, 20)
    n_pairs = -(-TILE * G // TH)  # the (key, head) scores a thread sums per tile, at most
    score_loop, score_mask, mask_regs = f"range({n_pairs})", pair_mask, ""
    if MASK_WITH_KV and not p.get("window"):  # (a ring kernel has no mask)
        score_loop, score_mask = f"T.unroll({n_pairs})", "mk[i]"
        mask_regs = f"""
                mk = T.alloc_buffer(({n_pairs},), "float32", scope="local")"""
        loads += f"""
                    for i in T.unroll({n_pairs}):  # this thread's scores' mask values, with K/V
                        if i * {TH} + tx < {TILE * G}:
                            mk[i] = {f32}({pair_mask})"""
    write = ring_write(p, min(128, max_threads)) if p.get("window") else ""
    src = kernel_source(p, decl, write + f'''    part_o = T.alloc_buffer(({KV * SM * G * D},),
                                                          "float32")
    part_ml = T.alloc_buffer(({KV * SM * G * 2},), "float32")
    for kvh in T.thread_binding({KV}, thread="blockIdx.y"):
        for s in T.thread_binding({splits}, thread="blockIdx.x"):
            for tx in T.thread_binding({TH}, thread="threadIdx.x"):
                sp = T.alloc_buffer(({TILE * stride},), "float32", scope="shared")
                ss = T.alloc_buffer(({TILE * G},), "float32", scope="shared")
                red = T.alloc_buffer(({L * GH * D},), "float32", scope="shared")
                red_m = T.alloc_buffer(({L * G},), "float32", scope="shared")
                red_l = T.alloc_buffer(({L * G},), "float32", scope="shared")
                qr = T.alloc_buffer(({G * V},), "float32", scope="local")
                acc = T.alloc_buffer(({G * V},), "float32", scope="local")
                mx = T.alloc_buffer(({G},), "float32", scope="local")
                sm = T.alloc_buffer(({G},), "float32", scope="local")
                sc = T.alloc_buffer(({R * G},), "float32", scope="local")
                kr = T.alloc_buffer(({R * V},), "{dt}", scope="local")
                vr = T.alloc_buffer(({R * V},), "{dt}", scope="local")
                t = T.alloc_buffer((2,), "float32", scope="local"){mask_regs}
                lane = tx // {DV}
                dv = tx % {DV}
                start = s * {chunk}
                end = T.min(start + {chunk}, m){first}
                for g in {u(G)}({G}):
                    for e in T.unroll({V}):  # (fp32 vectors wider than 4 lanes do not compile)
                        qr[g * {V} + e] = {f32}({q_src}) * {f32}({p["scale"]!r})
                        acc[g * {V} + e] = {f32}(0)
                    mx[g] = T.min_value("float32")
                    sm[g] = {f32}(0)
                for tl in range((end - start + {TILE - 1}) // {TILE}):
                    base = start + tl * {TILE}
{loads}
                    for r in {u(R)}({R}):
                        for g in {u(G)}({G}):
                            t[0] = {f32}(0)
                            for e in {u(V)}({V}):
                                t[0] = t[0] + qr[g * {V} + e] * {f32}(kr[r * {V} + e])
                            sp[(r * {L} + lane) * {stride} + dv * {G} + g] = t[0]
                    T.tvm_storage_sync("shared")
                    for i in {score_loop}:  # each (key, head) score summed once
                        if i * {TH} + tx < {TILE * G}:
                            t[0] = {f32}(0)
                            for c in {u(DV)}({DV}):
                                t[0] = t[0] + sp[{pair_key} * {stride} + c * {G} + {pair_head}]
                            ss[i * {TH} + tx] = T.if_then_else(
                                base + {pair_key} < end, {scaled_score(p, "t[0]", score_mask)},
                                -T.infinity("float32"))
                    T.tvm_storage_sync("shared")
                    for r in {u(R)}({R}):
                        for g in {u(G)}({G}):
                            sc[r * {G} + g] = ss[(r * {L} + lane) * {G} + g]
                    for g in {u(G)}({G}):
                        t[1] = mx[g]
                        for r in {u(R)}({R}):
                            t[1] = T.max(t[1], sc[r * {G} + g])
                        t[0] = T.exp(mx[g] - t[1])
                        mx[g] = t[1]
                        sm[g] = sm[g] * t[0]
                        for e in {u(V)}({V}):
                            acc[g * {V} + e] = acc[g * {V} + e] * t[0]
                        for r in {u(R)}({R}):
                            sc[r * {G} + g] = T.exp(sc[r * {G} + g] - t[1])
                            sm[g] = sm[g] + sc[r * {G} + g]
                    for r in {u(R)}({R}):
                        for g in {u(G)}({G}):
                            for e in {u(V)}({V}):
                                acc[g * {V} + e] = acc[g * {V} + e] + sc[r * {G} + g] * {f32}(vr[r * {V} + e])
                # merge the key lanes: rescale each to the split's max, then sum
                if dv == 0:
                    for g in {u(G)}({G}):
                        red_m[lane * {G} + g] = mx[g]
                T.tvm_storage_sync("shared")
                for g in {u(G)}({G}):
                    t[1] = T.min_value("float32")
                    for c in range({L}):
                        t[1] = T.max(t[1], red_m[c * {G} + g])
                    t[0] = T.exp(mx[g] - t[1])
                    mx[g] = t[1]
                    sm[g] = sm[g] * t[0]
                    for e in {u(V)}({V}):
                        acc[g * {V} + e] = acc[g * {V} + e] * t[0]
                if dv == 0:
                    for g in {u(G)}({G}):
                        red_l[lane * {G} + g] = sm[g]
                for gi in {u(G // GH)}({G // GH}):  # GH query heads' accumulators per round
                    for gg in {u(GH)}({GH}):
                        for e in T.unroll({V}):
                            red[(lane * {GH} + gg) * {D} + dv * {V} + e] = acc[(gi * {GH} + gg) * {V} + e]
                    T.tvm_storage_sync("shared")
                    for i in range({-(-GH * D // TH)}):
                        if i * {TH} + tx < {GH * D}:
                            t[0] = {f32}(0)
                            for c in range({L}):
                                t[0] = t[0] + red[c * {GH * D} + i * {TH} + tx]
                            part_o[((kvh * {SM} + s) * {G} + gi * {GH}) * {D} + i * {TH} + tx] = t[0]
                    T.tvm_storage_sync("shared")
                for i in range({-(-G // TH)}):
                    if i * {TH} + tx < {G}:
                        t[0] = {f32}(0)
                        t[1] = T.min_value("float32")
                        for c in range({L}):
                            t[0] = t[0] + red_l[c * {G} + i * {TH} + tx]
                            t[1] = T.max(t[1], red_m[c * {G} + i * {TH} + tx])
                        part_ml[((kvh * {SM} + s) * {G} + i * {TH} + tx) * 2] = t[1]
                        part_ml[((kvh * {SM} + s) * {G} + i * {TH} + tx) * 2 + 1] = t[0]
    for h in T.thread_binding({H}, thread="blockIdx.x"):
        for dc in T.thread_binding({D // DM}, thread="blockIdx.y"):
            for tx in T.thread_binding({DM * P}, thread="threadIdx.x"):
                w = T.alloc_buffer((4,), "float32", scope="local")  # max, num, den, new max
                lm = T.alloc_buffer(({UB},), "float32", scope="local")  # a round's m_s, l_s, o_s
                ll = T.alloc_buffer(({UB},), "float32", scope="local")
                lo = T.alloc_buffer(({UB},), "float32", scope="local")
                mr = T.alloc_buffer(({DM * P},), "float32", scope="shared")
                nr = T.alloc_buffer(({DM * P},), "float32", scope="shared")
                dr = T.alloc_buffer(({DM * P},), "float32", scope="shared")
                w[0] = T.min_value("float32")
                w[1] = {f32}(0)
                w[2] = {f32}(0)
{rounds}                mr[tx] = w[0]
                nr[tx] = w[1]
                dr[tx] = w[2]
                T.tvm_storage_sync("shared")
                if tx < {DM}:
                    w[3] = T.min_value("float32")
                    for c in range({P}):
                        w[3] = T.max(w[3], mr[c * {DM} + tx])
                    w[1] = {f32}(0)
                    w[2] = {f32}(0)
                    for c in range({P}):
                        w[1] = w[1] + nr[c * {DM} + tx] * T.exp(mr[c * {DM} + tx] - w[3])
                        w[2] = w[2] + dr[c * {DM} + tx] * T.exp(mr[c * {DM} + tx] - w[3])
                    {out_index(p, "h", "0", "dc * " + str(DM) + " + tx")} = T.Cast("{dt}", w[1] / w[2])
''', static)
    return parse(src, static)
