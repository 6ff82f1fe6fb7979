"""Prefill GEMM on Hopper with the 4-bit weight dequantized in registers, as wgmma's A operand.

:mod:`.gpu_gemm_wgmma_ws` computes ``Y[tokens, features] = X @ W`` with X as wgmma's A and the
dequantized W as its B, and B must come from shared memory: the producer warpgroup writes every
fp16 W slice there, and the tensor cores read it back once per consumer warpgroup. On the H200
(eighteenth session, Llama-1B gate/up at M = 512, 69.9 us against torch's 27.6) the kernel took
51.4 us without that dequant, 40.9 without it and the copies. A 64-deep slice of a 128 x 256
tile moves ~137 KB through shared memory (X and packed copies in, fp16 W written, A and twice B
read by the wgmmas) in the ~1,024 cycles its MMAs take at the tensor cores' rate: more than the
SM's 128 bytes a cycle.

Here the product is computed transposed, ``Y^T = W^T X^T`` (as vLLM's Machete does for mixed-input
GEMMs): the weight is wgmma's **A operand, from registers**, and X is B, from shared memory. Each
consumer thread reads its packed words from shared memory, dequantizes them (PRMT + LOP3 into
``1024 + q``, then ``- z`` and ``* s`` in fp16: the arithmetic of every other dequant here) into
the A fragment, and issues ``wgmma.mma_async ... {a0, a1, a2, a3}, desc(X)``. No fp16 W is ever
stored; the dequant runs on the consumers, between the asynchronous MMAs of the slice before;
each W element is dequantized ``M / TM`` times instead of ``M / 128``.

Layout
------
A workgroup computes ``TM`` tokens x ``TN`` features: ``TN / 64`` consumer warpgroups of 64
features, ``wgmma.m64n{TM}k16`` (N is the tokens), and one producer warpgroup.

* The A fragment (mma.sync's m16n8k16 A layout, per warp 16 rows): lane ``(g, t) = (l // 4,
  l % 4)`` holds rows ``g`` and ``g + 8``, k ``2t, 2t + 1`` and ``2t + 8, 2t + 9``. The packed
  weight (``codes32 [K/4, N/2]``, see :func:`.gpu_gemm_mma.packed_views`) holds in one uint32 the
  4 k rows of features ``2c`` and ``2c + 1``, a byte per 2 k. So rows ``g`` and ``g + 8`` of a
  warp's A are features ``2g`` and ``2g + 1`` of its 16 (the M order permuted; only the stores
  see it), and a thread's 4 registers are byte ``t % 2`` (feature 2g) and ``2 + t % 2`` (2g + 1)
  of two words: packed rows ``t // 2`` and ``t // 2 + 2`` of the k16 step. No other layout of
  the weight is needed (the decode GEMVs read the same tensor).
* X is B, K-major (each token's 8 k in 16 bytes), in the core matrices of
  :mod:`.gpu_gemm_wgmma` (``SBO`` apart in tokens, ``XL`` in K), copied by the producer as in
  :func:`.gpu_gemm_wgmma_ws.issue_slice`.
* Packed rows in shared memory ``PP = TN * 2 + PITCH_PAD`` bytes apart: a warp's two rows of
  8 words then start 8 banks apart (``PP / 4 = 8 mod 32``) and a load meets no bank conflict.
* The accumulators: rows are features ``2g``, ``2g + 1``, columns tokens ``8 j + 2t (+ 1)``;
  an fp16 output without an epilogue is stored two features (4 bytes) at a time, a warp
  writing 32 contiguous bytes of each of 4 token rows.

Pipeline: the producer copies slices ``S - 1`` ahead into a ring of ``S`` stages and arrives at
``FULL``; the consumers dequantize slice ``j`` into A set ``j % 2`` while slice ``j - 1``'s
wgmmas (set ``(j - 1) % 2``) run, issue slice ``j``'s, keep one slice in flight
(``wgmma.wait_group 1``) and release slice ``j - 1``'s stage at ``EMPTY``.

What it takes: what :func:`.gpu_gemm_wgmma.plan_kernel` takes, with a quantization group that
is a multiple of 16 (one group a k16 step) and divides the 64-deep slice or is a multiple of it.
Off by default (:data:`ENABLED`; ``bench.prefill --wgmma 256x128xwr4``, and ``-dequant``,
``-copy``, ``-mma``, ``-store`` for the diagnostics of :mod:`.gpu_gemm_wgmma_ws`), and it stays
off: on an H100 (twenty-first session, Llama-1B gate/up, M = 512, torch 28.1-28.2 us,
``results/issue16_gemm_w_in_registers_h100_s21.json``) the default warp-specialised kernel took
58.5-58.9 us; this one at 128 x 128 took 73.4 us (right), and at 256 x 128 59.4 us with NaN in
its output (the CPU emulation of the same CUDA C matches numpy; not found yet), 54.9 us with its
dequant left out. So even a free dequant leaves it at 0.51x torch: the shared-memory count
above was not what bounds the default kernel.
"""

from __future__ import annotations

from . import gpu_gemm_mma as mma_gemm
from . import gpu_gemm_wgmma as wg
from . import gpu_gemm_wgmma_ws as ws
from .cuda_mma import call
from .gpu_gemv import CODES_PER_WORD, MatchError
from .gpu_gemv_half2 import E0M4_ZERO_NONE

TILE = (256, 128)  # (tokens, features) a workgroup: m64n256k16, two consumer warpgroups
STAGES = 4  # slices in the ring
# On: GPUPrefillGEMM's default on sm_90a takes this kernel (TILE, STAGES) for the GEMMs of the
# kinds in ENABLED_FOR: "deep" (down) and "wide" (gate/up), the warp-specialised kernel's today,
# and "other" (q, o, k/v: mma.sync's today). Off: no faster on an H100, and wrong at 256 x 128
# (the module docstring).
ENABLED = False
ENABLED_FOR = ("deep", "wide")
PITCH_PAD = 32  # bytes after each packed row in shared memory (see the module docstring)
# Registers a thread after ``setmaxnreg``: the producer gives back what it does not need, the
# consumers take it (their accumulators, ``TM / 2`` fp32, and two A sets of 16). ptxas gives
# each thread of a 384-thread workgroup 168; an ``inc`` waits until the registers the ``dec``s
# freed cover it, so the consumers get 168 + (168 - 40) / 2 = 232 (what CUTLASS's Hopper kernels
# use). Without it, 256 x 128 spills 48 bytes and serializes the wgmmas (nvcc 13, sm_90a); with
# it, nothing spills at 256 x 128 or 128 x 128, gate/up or down (K split, residual add); with X
# by rows 8-84 bytes spill (40 or 56 left to the producer), and 128 x 256 (four consumer
# warpgroups, 104 registers each) spills and serializes. ptxas ignores it (C7508) where the kernel
# needs fewer registers than the cap.
PRODUCER_REGISTERS = 40
REGISTER_FILE = 65536  # 32-bit registers of an SM


def _wgmma_rs_helper(n: int) -> str:
    """``tvm_lite_gemm_wgmma_rs_m64n{n}k16(d, a0, a1, a2, a3, b, b_lbo)``: ``d += A @ B`` for a
    warpgroup, A (64 x 16) from registers, B (16 x n) K-major in shared memory (core matrices
    ``SBO`` bytes apart in N and ``b_lbo`` in K; ``imm-trans-b`` 0)."""
    regs = n // 2
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    lst = ", ".join(f"%{i}" for i in range(regs))
    return f"""
__forceinline__ __device__ void tvm_lite_gemm_wgmma_rs_m64n{n}k16(float* d, unsigned a0, unsigned a1,
                                                              unsigned a2, unsigned a3,
                                                              const void* b, unsigned b_lbo) {{
  unsigned long long db = (((unsigned)__cvta_generic_to_shared(b) & 0x3FFFF) >> 4) |
                          ((unsigned long long)((b_lbo & 0x3FFFF) >> 4) << 16) |
                          ((unsigned long long)({wg.SBO} >> 4) << 32);
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 5}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{lst}}}, {{%{regs}, %{regs + 1}, %{regs + 2}, %{regs + 3}}}, %{regs + 4}, p, 1, 1, 0;\\n}}"
               : {outs} : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(1));
}}
"""


HELPERS = {
    **ws.HELPERS,
    # The A fragment of one k16 step: a[0], a[1] from the word at p1 (k 2t, 2t + 1 of features
    # 2g and 2g + 1: bytes b and b + 2), a[2], a[3] from the word at p2 (k 2t + 8, 2t + 9). PRMT
    # puts byte b of w and of w >> 4 in the two halves, LOP3 keeps their low nibbles and ORs in
    # 0x6400: half2(1024 + q_k, 1024 + q_k+1). z2, s2: the two features' zero and scale.
    "tvm_lite_dq_afrag": r"""
__forceinline__ __device__ void tvm_lite_dq_afrag(unsigned* a, const void* p1, const void* p2,
                                                  unsigned b, unsigned z2, unsigned s2) {
  unsigned zl = __byte_perm(z2, 0, 0x1010), zh = __byte_perm(z2, 0, 0x3232);
  unsigned sl = __byte_perm(s2, 0, 0x1010), sh = __byte_perm(s2, 0, 0x3232);
  unsigned lo = b * 0x1111u + 0x0400u, hi = lo + 0x2222u;  // bytes (b, b, 4 + b, b), b + 2
  const unsigned w[2] = {*reinterpret_cast<const unsigned*>(p1),
                         *reinterpret_cast<const unsigned*>(p2)};
  for (int i = 0; i < 2; ++i) {
    unsigned t = w[i] >> 4;
    unsigned q0 = __byte_perm(w[i], t, lo), q1 = __byte_perm(w[i], t, hi);
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(q0) : "r"(q0), "r"(0x000F000Fu), "r"(0x64006400u));
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(q1) : "r"(q1), "r"(0x000F000Fu), "r"(0x64006400u));
    __half2 r0 = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&q0), *reinterpret_cast<__half2*>(&zl)),
                         *reinterpret_cast<__half2*>(&sl));
    __half2 r1 = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&q1), *reinterpret_cast<__half2*>(&zh)),
                         *reinterpret_cast<__half2*>(&sh));
    a[2 * i] = *reinterpret_cast<unsigned*>(&r0);
    a[2 * i + 1] = *reinterpret_cast<unsigned*>(&r1);
  }
}
""",
    "tvm_lite_lds_u32": r"""
__forceinline__ __device__ unsigned tvm_lite_lds_u32(const void* p) {
  return *reinterpret_cast<const unsigned*>(p);
}
""",
}
for _n in (64, 128, 256):
    HELPERS[f"tvm_lite_gemm_wgmma_rs_m64n{_n}k16"] = _wgmma_rs_helper(_n)
for _r in range(24, 257, 8):  # setmaxnreg takes a multiple of 8 in 24 .. 256
    for _way in ("inc", "dec"):
        HELPERS[f"tvm_lite_setmaxnreg_{_way}_{_r}"] = f"""
__forceinline__ __device__ void tvm_lite_setmaxnreg_{_way}_{_r}() {{
  asm volatile("setmaxnreg.{_way}.sync.aligned.u32 {_r};");
}}
"""


def consumer_registers(consumer_groups: int) -> int:
    """Registers a consumer thread takes by ``setmaxnreg.inc``: the launch's share
    (``REGISTER_FILE / threads`` as ptxas allocates it, a multiple of 8) plus what the producer
    freed, split among the consumer warpgroups."""
    start = min(256, REGISTER_FILE // (ws.PRODUCER * (1 + consumer_groups)) // 8 * 8)
    return min(256, (start + (start - PRODUCER_REGISTERS) // consumer_groups) // 8 * 8)


def pitch(TN: int) -> int:
    """Bytes between packed rows (and scale / zero rows) in shared memory."""
    return TN * 2 + PITCH_PAD


def shared_bytes(g: dict, TM: int, TN: int, stages: int, x_rows: bool = False) -> int:
    """Bytes of shared memory a workgroup uses: per stage X and the packed slice."""
    XS = (wg.TK // 8) * ((TM // 8) * wg.SBO + ws.x_skew(x_rows))
    RG = max(1, wg.TK // g["group"])
    RS = (wg.TK // CODES_PER_WORD + RG * (2 if g["fmt"] == "e0m4" else 1)) * pitch(TN)
    return stages * (XS + RS)


def kernel_source(func, g: dict, tile, stages: int = STAGES, x_rows: bool = False,
                  ablate=()) -> str:
    """TVMScript of the kernel (roles ``g`` from :func:`.gpu_gemm_mma.match_gemm`, ``tile =
    (TM, TN, KS)``: tokens, features, K split); its stores write ``__tvm_lite_epilogue__(acc)``.
    ``x_rows``: X copied a row segment a warp quarter (see :mod:`.gpu_gemm_wgmma_ws`).
    ``ablate``: parts of :data:`.gpu_gemm_wgmma_ws.ABLATIONS` left out, as there (a diagnostic:
    the result is wrong) -- the copies after the first ``S - 1`` slices, the dequant (the A
    registers get a value made from the slice index: no word loaded, none dequantized), the
    wgmmas, the stores."""
    names, params, decls = mma_gemm._decl(func)
    TM, TN, KS = tile
    TK, SBO, h = wg.TK, wg.SBO, 2
    K, N, M, G = g["k"], g["n"], g["m"], g["group"]
    x, out = names[g["roles"]["x"]], names[g["roles"]["out"]]
    xbuf, obuf = func.params[g["roles"]["x"]], func.params[g["roles"]["out"]]
    S, PT = stages, ws.PRODUCER
    threads = PT * (1 + TN // 64)
    FULL, EMPTY = 1, 1 + S  # named barrier ids
    XL = (TM // 8) * SBO + ws.x_skew(x_rows)
    XS = (TK // 8) * XL
    PP = pitch(TN)
    RG = max(1, TK // G)
    CB, GB = (TK // CODES_PER_WORD) * PP, RG * PP  # bytes: packed codes, scale rows
    RS = CB + GB * (2 if g["fmt"] == "e0m4" else 1)
    RB = S * XS  # byte offset of the packed ring
    KT = K // TK // KS
    kn = "(bz * %d + {k})" % KT if KS > 1 else "{k}"
    warp, lane = "(tx // 32)", "(tx % 32)"
    indent, ev = mma_gemm.indent, ws.ev

    def issue(k: str, slot: str) -> str:
        return ws.issue_slice(k, slot, g, x, xbuf, (TM, TN, KS), kn, XS, XL, RB, RS, x_rows, PP)

    producer = ws.producer_loop(issue, S, KT, threads, [], ablate)

    wgi = f"({warp} // 4 - 1)"  # consumer warpgroup
    gq, tq = f"({lane} // 4)", f"({lane} % 4)"
    cp = f"({wgi} * 32 + {warp} % 4 * 8 + {gq})"  # the thread's feature pair in the tile
    packed = f"{RB} + j % {S} * {RS}"

    def at(off: str) -> str:
        return f"T.address_of(sm[({packed} + {off}) // {h}])"

    grow = f"(s * 16 // {G})" if G < TK else "0"  # the k16 step's scale row in the slice
    zero = (call("tvm_lite_lds_u32", at(f"{CB + GB} + {grow} * {PP} + {cp} * 4"), ret="uint32")
            if g["fmt"] == "e0m4" else f"T.uint32({E0M4_ZERO_NONE})")
    scale = call("tvm_lite_lds_u32", at(f"{CB} + {grow} * {PP} + {cp} * 4"), ret="uint32")

    def slice_body(a: int) -> str:
        """Slice ``j``'s dequant into A set ``a`` and its wgmmas."""
        dq = call("tvm_lite_dq_afrag", f"T.address_of(af[{a * 16} + s * 4])",
                  at(f"(s * 4 + {tq} // 2) * {PP} + {cp} * 4"),
                  at(f"(s * 4 + {tq} // 2 + 2) * {PP} + {cp} * 4"),
                  f"T.Cast('uint32', {tq} % 2)", zero, scale)
        b_addr = f"T.address_of(sm[(j % {S} * {XS} + s * 2 * {XL}) // {h}])"
        mma = call(f"tvm_lite_gemm_wgmma_rs_m64n{TM}k16", "T.address_of(acc[0])",
                   *(f"af[{a * 16} + s * 4 + {i}]" for i in range(4)), b_addr, f"T.uint32({XL})")
        if "dequant" in ablate:  # no loads, no dequant: a value the compiler cannot fold
            dq = (f"for i in T.unroll(4):\n"
                  f"        af[{a * 16} + s * 4 + i] = T.Cast('uint32', j * 4 + i)")
        else:
            dq = f"T.evaluate({dq})"
        return "\n".join([f"for s in T.unroll({TK // 16}):", f"    {dq}",
                          ev("tvm_lite_wgmma_fence"),
                          f"for s in T.unroll({TK // 16}):",
                          f"    T.evaluate({0 if 'mma' in ablate else mma})",
                          ev("tvm_lite_wgmma_commit")])

    # accumulator jn * 4 + c: feature 2g + c // 2 of the warp's 16, token 8 jn + 2t + c % 2
    feat = f"bx * {TN} + {wgi} * 64 + {warp} % 4 * 16 + {gq} * 2"
    tok = f"by * {TM} + jn * 8 + {tq} * 2"
    workspace, store, sum_kernel = mma_gemm.output_store(
        out, obuf, M, N, KS, f"{tok} + c % 2", f"{feat} + c // 2", "acc[jn * 4 + c]")
    pair, _ = ws.store_modes(g, KS, True, False)
    # an ablated store: a condition the compiler cannot prove false, never true here
    never = " and acc[0] == T.float32(3.0e38)" if "store" in ablate else ""
    if pair:  # features 2g, 2g + 1 of one token in one 4-byte store
        pst = ev("tvm_lite_st_f16x2",
                 f"T.address_of({out}[{mma_gemm._row_at(obuf, f'{tok} + hc', feat)}])",
                 "acc[jn * 4 + hc]", "acc[jn * 4 + 2 + hc]")
        stores = [f"for jn in T.unroll({TM // 8}):", "    for hc in T.unroll(2):",
                  f"        if {tok} + hc < {M}{never}:", f"            {pst}"]
    else:
        stores = [f"for jn in T.unroll({TM // 8}):", "    for c in T.unroll(4):",
                  f"        if {tok} + c % 2 < {M}{never}:", f"            {store}"]
    consumer = "\n".join([
        f"for i in T.unroll({TM // 2}):",
        "    acc[i] = T.float32(0)",
        f"for j in T.serial({KT}):",
        "    " + ev("tvm_lite_bar_sync", f"T.Cast('int32', {FULL} + j % {S})", f"T.int32({threads})"),
        "    if j % 2 == 0:",  # the A set a static index: both bodies written out
        indent(slice_body(0), 8),
        "    else:",
        indent(slice_body(1), 8),
        "    " + ev("tvm_lite_wgmma_wait1"),
        f"    if j >= 1 and j - 1 + {S} < {KT}:",
        "        " + ev("tvm_lite_bar_arrive", f"T.Cast('int32', {EMPTY} + (j - 1) % {S})",
                         f"T.int32({threads})"),
        ev("tvm_lite_wgmma_wait0"),
        *stores])
    head = mma_gemm.kernel_head("gemm_wgmma_wreg", params, decls,
                                mma_gemm.packed_views(names, g), workspace,
                                (N // TN, KS, f"({M} + {TM - 1}) // {TM}", threads))
    return f'''{head}
                sm = T.alloc_buffer(({S * (XS + RS) // h},), "float16", scope="shared.dyn")
                acc = T.alloc_buffer(({TM // 2},), "float32", scope="local")
                af = T.alloc_buffer((32,), "uint32", scope="local")
                if tx < {PT}:
                    {ev(f"tvm_lite_setmaxnreg_dec_{PRODUCER_REGISTERS}")}
{indent(chr(10).join(producer), 20)}
                else:
                    {ev(f"tvm_lite_setmaxnreg_inc_{consumer_registers(TN // 64)}")}
{indent(consumer, 20)}
{sum_kernel}'''


def wreg_gemm_kernel(func, target, profile, tile=None, stages: int = STAGES,
                     x_rows: bool = False, ablate=(), lengths=None):
    """The kernel for ``func`` as a :class:`tvm.s_tir.Schedule`, or raise :class:`MatchError`
    where it does not apply. ``tile``: ``(TM tokens, TN features[, KS])``, K split by
    :func:`.gpu_gemm_wgmma.choose_split` where not given; default: :data:`TILE` planned for
    each of ``lengths`` (default :data:`.gpu_gemm_mma.PLAN_LENGTHS`, see
    :func:`.gpu_gemm_mma.lengths_for`), half its tokens for a prompt shorter than two tiles;
    ``stages``: 2 to 7 (two named barriers a stage, 15 besides ``__syncthreads``');
    ``x_rows``, ``ablate``: see :func:`kernel_source`."""
    unknown = sorted(set(ablate) - set(ws.ABLATIONS))
    if unknown:
        raise ValueError(f"ablate: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(ws.ABLATIONS)})")
    if not 2 <= stages <= (ws.NAMED_BARRIERS - 1) // 2:
        raise MatchError(f"stages={stages}: 2 to {(ws.NAMED_BARRIERS - 1) // 2}")
    sch, func, g, TM, TN, ks = wg.plan_kernel(func, target, profile, tile or TILE)
    G = g["group"]
    if G % 16 or (wg.TK % G and G % wg.TK):
        raise MatchError(f"quantization group {G}: W in registers needs a multiple of 16 that "
                         f"divides the {wg.TK}-deep slice or is a multiple of it")
    if TN // 64 + 1 > 8:
        raise MatchError(f"{TN} features: at most 7 consumer warpgroups of 64")
    plans = [(None, (TM, TN, ks))]
    if tile is None:  # a plan a prompt length: fewer tokens a tile for short prompts
        plans = []
        for length, cond in mma_gemm.lengths_for(g["m"], lengths):
            tm = TM if length >= 2 * TM else TM // 2
            plans.append((cond, (tm, TN, wg.choose_split(length, g["n"], g["k"], (tm, TN),
                                                         profile.compute_units))))
    src, label = mma_gemm.by_length([
        (cond, kernel_source(func, g, plan, stages, x_rows, ablate),
         "wgmma_m64n%dk16 %dx%d split-K %d W in registers x%d%s%s"
         % (plan[0], plan[0], plan[1], plan[2], stages, " x rows" if x_rows else "",
            "".join(f" -{a}" for a in ablate))) for cond, plan in plans])
    shared = max(shared_bytes(g, tm, tn, stages, x_rows) for _, (tm, tn, _) in plans)
    return wg.finish_kernel(src, HELPERS, sch, func, g, shared, label)


def default_kernel(func, target, profile, lengths=None):
    """:func:`wreg_gemm_kernel` at :data:`TILE` (by prompt length: ``lengths``) and
    :data:`STAGES` for a GEMM on sm_90a of a kind in :data:`ENABLED_FOR` (see
    :func:`.gpu_gemm_wgmma_ws.deep_or_wide`; "other" for the rest) when :data:`ENABLED`;
    :class:`MatchError` otherwise."""
    if not ENABLED:
        raise MatchError("gpu_gemm_wgmma_wreg.ENABLED is off")
    if not wg.wgmma_supported(target):
        raise MatchError("wgmma needs a CUDA sm_90a target")
    kind = ws.deep_or_wide(func, target, profile) or "other"
    if kind not in ENABLED_FOR:
        raise MatchError(f"a {kind} GEMM: not in gpu_gemm_wgmma_wreg.ENABLED_FOR")
    return wreg_gemm_kernel(func, target, profile, None, STAGES, lengths=lengths)


__all__ = ["wreg_gemm_kernel", "default_kernel", "kernel_source", "HELPERS", "TILE", "STAGES",
           "ENABLED", "ENABLED_FOR"]
