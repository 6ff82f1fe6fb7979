"""Prefill GEMM on Hopper's warpgroup tensor cores (``wgmma``, sm_90a), 4-bit weights.

The same job as :mod:`.gpu_gemm_mma` (``Y = epilogue(X[.., M, K] @ dequant(W)[K, N])``, E0M4 or
int4 ``W``), for a CUDA target whose arch is ``sm_90a``. ``mma.sync`` reaches about half of an
H100/H200's fp16 tensor-core rate; ``wgmma.mma_async`` (a warpgroup of 4 warps, operands read
from shared memory through descriptors, accumulators in registers) reaches the rest.

Kernel
------
A workgroup of ``TM / 64`` warpgroups computes a ``TM x TN`` tile of ``Y``; warpgroup ``i``
owns rows ``64 i .. 64 i + 63``, one ``wgmma.m64n{TN}k16`` per 16 of K. Per ``TK = 64`` slice
of ``K``::

    global -> registers   X[TM, TK] (16-byte loads, rows past M zero); the packed codes
                          (8 columns x 4 rows per 16-byte load) with their scale and zero
    registers -> shared   X as loaded; W dequantized on the way, written K-major (each column's
                          4 rows of a packed word are 8 contiguous bytes): PRMT + LOP3 make
                          half2(1024 + q_k, 1024 + q_k+1), then ``- c`` and ``* s`` in fp16 --
                          the TIR dequant's exact arithmetic, as in the mma kernel
    wgmma                 ``TK / 16`` async MMAs a warpgroup, both operands by descriptor

Shared memory holds both operands in the *canonical K-major layout without swizzle*: "core
matrices" of 8 rows (M or N) x 16 bytes (8 of K), each 128 contiguous bytes. A descriptor gives
the byte distance between core matrices adjacent in K (LBO) and in M/N (SBO). Core matrices
adjacent in M/N are 144 bytes apart, not 128, and for X those adjacent in K are 64 bytes off a
multiple of 128, so that the stores of a quarter-warp hit 8 different 16-byte bank groups.

Two stages alternate: the loads of slice ``k + 1`` are issued before the MMAs of slice ``k``;
the MMAs run asynchronously while the threads dequantize and store slice ``k + 1`` into the
other stage; then ``wgmma.wait_group 0``, ``fence.proxy.async`` (the generic-proxy stores made
visible to the tensor cores' async proxy) and one barrier per slice. K may be split across
workgroups (fp32 partials summed by a second kernel), as in the mma kernel.

What it takes: what :func:`.gpu_gemm_mma.match_gemm` takes, with 4-bit weights, ``N`` a multiple
of ``TN`` and ``K`` of ``TK``; anything else goes to the mma kernel.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.script import from_source
from tvm.script import tirx as T

from . import gpu_gemm_mma as mma_gemm
from .cuda_mma import HELPERS as MMA_HELPERS
from .cuda_mma import call
from .gpu_gemv import CODES_PER_WORD, MatchError
from .gpu_gemv_half2 import attach_epilogue

TK = 64  # K per shared slice
VEC = 8  # fp16 per 16-byte load
CORE = 128  # bytes of a core matrix (8 rows x 16 bytes)
SBO = CORE + 16  # bytes between core matrices adjacent in M / N (16 bytes of padding)
X_LBO_SKEW = 64  # X: core matrices adjacent in K sit 64 bytes off a multiple of 128
TILE = (128, 128)  # (TM, TN): two warpgroups, m64n128k16
SHARED_MAX = 227 * 1024  # dynamic shared memory a workgroup may have on sm_90
# GPUPrefillGEMM tries this kernel before the mma one on sm_90a targets when on. Off: measured on
# the H200 (``bench.prefill --parts gemm --gemm-variants e0m4 --wgmma 128x128x0,128x256x0,...``,
# ``results/issue16_prefill_gemm_wgmma_sweep_s14.json``) it runs no faster than the mma.sync
# kernel -- gate/up 66.6 vs 66.3 us (Llama-1B, 128x256), down 76.4 vs 77.7 (Llama-1B) and 135.4
# vs 142.8 (Gemma-2B), k/v slower -- and X by cp.async rings of 3-4 slices was slower still. The
# tensor cores are not what limits these GEMMs; the staging is (see the README, issue 16).
ENABLED = False
X_STAGES = 0  # X through registers (0) or a cp.async ring of this many slices


def _wgmma_helper(n: int) -> str:
    """CUDA source of ``tvm_lite_wgmma_m64n{n}k16(d, a, b, a_lbo, b_lbo)``: ``d += A @ B`` for a
    warpgroup, ``A`` (64 x 16) at ``a`` and ``B`` (16 x n) at ``b`` in shared memory, K-major
    core matrices ``SBO`` bytes apart in M / N and ``*_lbo`` in K. The descriptors (PTX ISA,
    "Matrix Descriptor Format"): bits 0-13 address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, no
    swizzle."""
    regs = n // 2  # fp32 accumulators a thread
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    lst = ", ".join(f"%{i}" for i in range(regs))
    return f"""
__forceinline__ __device__ void tvm_lite_wgmma_m64n{n}k16(float* d, const void* a, const void* b,
                                                       unsigned a_lbo, unsigned b_lbo) {{
  unsigned long long sbo = (unsigned long long)({SBO} >> 4) << 32;
  unsigned long long da = (((unsigned)__cvta_generic_to_shared(a) & 0x3FFFF) >> 4) |
                          ((unsigned long long)((a_lbo & 0x3FFFF) >> 4) << 16) | sbo;
  unsigned long long db = (((unsigned)__cvta_generic_to_shared(b) & 0x3FFFF) >> 4) |
                          ((unsigned long long)((b_lbo & 0x3FFFF) >> 4) << 16) | sbo;
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{lst}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}"
               : {outs} : "l"(da), "l"(db), "r"(1));
}}
"""


HELPERS = {
    # one packed word (columns 2c, 2c + 1, rows r .. r + 3) dequantized K-major: column 2c's
    # four halves at p, column 2c + 1's at p + 16 bytes (the next row of the core matrix).
    # t = w >> 4 puts each odd row's code in the low nibble of its byte; PRMT takes a byte of w
    # (even row) and the same byte of t (odd row) into the two halves of a half2; LOP3 keeps the
    # low nibbles and ORs in 0x6400 (fp16 1024 + q). z2, s2: the two columns' zero and scale.
    "tvm_lite_dq_kmajor": r"""
__forceinline__ __device__ void tvm_lite_dq_kmajor(void* p, unsigned w, unsigned z2, unsigned s2) {
  unsigned t = w >> 4, h[4];
  unsigned zl = __byte_perm(z2, 0, 0x1010), zh = __byte_perm(z2, 0, 0x3232);
  unsigned sl = __byte_perm(s2, 0, 0x1010), sh = __byte_perm(s2, 0, 0x3232);
  const unsigned sel[4] = {0x0400, 0x0501, 0x0602, 0x0703};
  for (int i = 0; i < 4; ++i) {
    unsigned q = __byte_perm(w, t, sel[i]);
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(q) : "r"(q), "r"(0x000F000Fu), "r"(0x64006400u));
    __half2 c = *reinterpret_cast<__half2*>(i < 2 ? &zl : &zh);
    __half2 s = *reinterpret_cast<__half2*>(i < 2 ? &sl : &sh);
    __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&q), c), s);
    h[i] = *reinterpret_cast<unsigned*>(&r);
  }
  *reinterpret_cast<uint2*>(p) = make_uint2(h[0], h[1]);
  *reinterpret_cast<uint2*>(reinterpret_cast<char*>(p) + 16) = make_uint2(h[2], h[3]);
}
""",
}
for _n in (64, 128, 192, 256):
    HELPERS[f"tvm_lite_wgmma_m64n{_n}k16"] = _wgmma_helper(_n)
# one-instruction helpers: the warpgroup MMA's fence, commit and wait, the proxy fence that hands
# generic-proxy shared stores to the tensor cores; cp.async's group commit and waits (X by
# cp.async: wait_group N waits until at most N groups of the thread are in flight)
_ASM = {"tvm_lite_wgmma_fence": "wgmma.fence.sync.aligned;",
        "tvm_lite_wgmma_commit": "wgmma.commit_group.sync.aligned;",
        "tvm_lite_wgmma_wait0": "wgmma.wait_group.sync.aligned 0;",
        "tvm_lite_fence_async_shared": "fence.proxy.async.shared::cta;",
        "tvm_lite_cp_async_commit": "cp.async.commit_group;",
        **{f"tvm_lite_cp_async_wait_group{_n}": f"cp.async.wait_group {_n};" for _n in range(5)}}
for _name, _asm in _ASM.items():
    HELPERS[_name] = f"""
__forceinline__ __device__ void {_name}() {{
  asm volatile("{_asm}" ::: "memory");
}}
"""
HELPERS["tvm_lite_cp_async16"] = MMA_HELPERS["tvm_lite_cp_async16"]


def wgmma_supported(target) -> bool:
    """``wgmma`` needs the arch-specific Hopper target, ``sm_90a``."""
    return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == "sm_90a"


def choose_split(m: int, n: int, k: int, tile, compute_units: int) -> int:
    """K split for the grid of ``tile`` at ``M = m`` (:func:`.gpu_gemm_mma.split_ways`)."""
    return mma_gemm.split_ways(-(-m // tile[0]) * (n // tile[1]), k // TK, compute_units)


def kernel_source(func, g: dict, tile, x_stages: int = 0) -> str:
    """TVMScript of the kernel for ``func`` (roles ``g`` from :func:`.gpu_gemm_mma.match_gemm`,
    ``tile = (TM, TN, KS)``); its stores write ``__tvm_lite_epilogue__(acc)``. ``x_stages``: 0,
    X staged through registers like W; 2 or more, X copied by ``cp.async`` into a ring of that
    many slices, ``x_stages - 1`` of them in flight ahead of the MMAs."""
    names, params, decls = mma_gemm._decl(func)
    TM, TN, KS = tile
    K, N, M, G = g["k"], g["n"], g["m"], g["group"]
    x, out = names[g["roles"]["x"]], names[g["roles"]["out"]]
    xbuf, obuf = func.params[g["roles"]["x"]], func.params[g["roles"]["out"]]
    threads = 32 * 4 * (TM // 64)
    h = 2  # bytes of an fp16
    XL = (TM // 8) * SBO + X_LBO_SKEW  # X: bytes between core matrices adjacent in K
    WL = (TN // 8) * SBO  # W: the same
    XS, WS = (TK // 8) * XL, (TK // 8) * WL  # bytes of one stage's X, W
    XN = max(2, x_stages)  # X slots: the cp.async ring, or two register-staged buffers
    WB = XN * XS  # byte offset of the two W slots
    KT = K // TK // KS  # slices of one split
    warp, lane = "(tx // 32)", "(tx % 32)"
    g4, t4 = f"({lane} // 4)", f"({lane} % 4)"

    def at(text: str, kn: str, sb: str) -> str:
        return mma_gemm.slice_at(text, kn, sb, KS, KT)

    indent = mma_gemm.indent

    # X: 16-byte vectors; two threads a row (32 contiguous bytes), 4 rows a quarter-warp
    xs = TM * TK // VEC // threads
    xe = f"(l * {threads} + tx)"
    xm, xk = f"({xe} // 2 % {TM})", f"(({xe} // {2 * TM}) * 2 + {xe} % 2)"  # row, 8-of-K index
    x_off = f"(({{sb}}) * {XS} + {xk} * {XL} + {xm} // 8 * {SBO} + {xm} % 8 * 16) // {h}"
    x_load = f'''for l in T.unroll({xs}):
    if by * {TM} + {xm} < {M}:
        xv[T.Ramp(l * {VEC}, 1, {VEC})] = {x}[{mma_gemm._row_at(xbuf, f"by * {TM} + {xm}", f"T.Ramp({{kn}} * {TK} + {xk} * {VEC}, 1, {VEC})")}]
    else:
        xv[T.Ramp(l * {VEC}, 1, {VEC})] = T.Broadcast(T.float16(0), {VEC})'''
    x_store = f'''for l in T.unroll({xs}):
    sm[T.Ramp({x_off}, 1, {VEC})] = xv[T.Ramp(l * {VEC}, 1, {VEC})]'''
    if x_stages:  # straight into slot {sb}; rows past M get zeros by a plain store
        copy = call("tvm_lite_cp_async16", f"T.address_of(sm[{x_off}])", f"T.address_of({x}[{mma_gemm._row_at(xbuf, f'by * {TM} + {xm}', f'{{kn}} * {TK} + {xk} * {VEC}')}])")
        x_load = f'''for l in T.unroll({xs}):
    if by * {TM} + {xm} < {M}:
        T.evaluate({copy})
    else:
        sm[T.Ramp({x_off}, 1, {VEC})] = T.Broadcast(T.float16(0), {VEC})'''

    # W: a thread takes one packed row (4 of K) of 8 columns; a half-warp covers 8 column groups
    # x 2 packed rows, so its 8-byte stores hit 16 different bank pairs
    ws_ = (TK // CODES_PER_WORD) * (TN // VEC) // threads
    we = f"(l * {threads} + tx)"
    wg = f"({we} % 8 + {we} // 16 % {TN // 64} * 8)"  # 8-column group
    wr = f"({we} // 16 // {TN // 64} * 2 + {we} // 8 % 2)"  # packed row of the slice
    col2 = f"((bx * {TN} + {wg} * 8) // 2)"
    grp = f"(({{kn}} * {TK} + {wr} * {CODES_PER_WORD}) // {G})"
    P = VEC // 2
    views = mma_gemm.packed_views(names, g)
    load, zero_at = mma_gemm.packed_load(g, f"{{kn}} * {TK // CODES_PER_WORD} + {wr}", grp, col2,
                                         " " * 4)
    w_load = f'''for l in T.unroll({ws_}):
    {load}'''
    # column wg * 8 + 2p (and + 1), rows 4 wr .. 4 wr + 3 of the slice
    w_off = (f"({WB} + ({{sb}}) * {WS} + ({wr} // 2) * {WL} + {wg} * {SBO} + p * 32 + {wr} % 2 * 8)"
             f" // {h}")
    dq = call("tvm_lite_dq_kmajor", f"T.address_of(sm[{w_off}])", f"wv[l * {P} + p]", zero_at,
              f"sv[l * {P} + p]")
    w_store = f'''for l in T.unroll({ws_}):
    for p in T.unroll({P}):
        T.evaluate({dq})'''

    wgi = f"({warp} // 4)"  # warpgroup
    a_addr = f"T.address_of(sm[(ko % {XN} * {XS} + kk * 2 * {XL} + {wgi} * 8 * {SBO}) // {h}])"
    b_addr = f"T.address_of(sm[({WB} + ko % 2 * {WS} + kk * 2 * {WL}) // {h}])"
    NJ = TN // 8
    row = f"by * {TM} + {wgi} * 64 + {warp} % 4 * 16 + {g4} + c // 2 * 8"
    col = f"bx * {TN} + j * 8 + {t4} * 2 + c % 2"
    value = "acc[j * 4 + c]"
    workspace, store, sum_kernel = mma_gemm.output_store(out, obuf, M, N, KS, row, col, value)
    fence = f'T.evaluate({call("tvm_lite_fence_async_shared")})'
    mma = call(f"tvm_lite_wgmma_m64n{TN}k16", "T.address_of(acc[0])", a_addr, b_addr,
               f"T.uint32({XL})", f"T.uint32({WL})")
    wgmma = f'''T.evaluate({call("tvm_lite_wgmma_fence")})
for kk in T.unroll({TK // 16}):
    T.evaluate({mma})
T.evaluate({call("tvm_lite_wgmma_commit")})'''
    if not x_stages:  # slice ko + 1 loaded into registers before slice ko's MMAs
        prologue = "\n".join([at(x_load, "0", ""), at(w_load, "0", ""), at(x_store, "", "0"),
                               at(w_store, "", "0"), fence, 'T.tvm_storage_sync("shared")'])
        loop = "\n".join([
            f"if ko + 1 < {KT}:", indent(at(x_load, "(ko + 1)", ""), 4),
            indent(at(w_load, "(ko + 1)", ""), 4), wgmma, f"if ko + 1 < {KT}:",
            indent(at(x_store, "", "(ko + 1) % 2"), 4), indent(at(w_store, "", "(ko + 1) % 2"), 4),
            f'T.evaluate({call("tvm_lite_wgmma_wait0")})', fence, 'T.tvm_storage_sync("shared")'])
    else:  # X slices ko + 1 .. ko + x_stages - 1 in flight; W one slice ahead through registers
        commit = f'T.evaluate({call("tvm_lite_cp_async_commit")})'
        wait = f'T.evaluate({call(f"tvm_lite_cp_async_wait_group{x_stages - 2}")})'
        ahead = []
        for i in range(x_stages - 1):
            ahead += [f"if {i} < {KT}:", indent(at(x_load, str(i), str(i)), 4), commit]
        prologue = "\n".join(ahead + [at(w_load, "0", ""), at(w_store, "", "0"), wait, fence,
                                       'T.tvm_storage_sync("shared")'])
        nxt = f"(ko + {x_stages - 1})"
        loop = "\n".join([
            f"if {nxt} < {KT}:", indent(at(x_load, nxt, f"{nxt} % {XN}"), 4), commit,
            f"if ko + 1 < {KT}:", indent(at(w_load, "(ko + 1)", ""), 4), wgmma,
            f"if ko + 1 < {KT}:", indent(at(w_store, "", "(ko + 1) % 2"), 4),
            f'T.evaluate({call("tvm_lite_wgmma_wait0")})', wait, fence,
            'T.tvm_storage_sync("shared")'])
    prologue, loop = indent(prologue, 16), indent(loop, 20)
    head = mma_gemm.kernel_head("gemm_wgmma", params, decls, views, workspace,
                                (N // TN, KS, f"({M} + {TM - 1}) // {TM}", threads))
    return f'''{head}
                sm = T.alloc_buffer(({(XN * XS + 2 * WS) // h},), "float16", scope="shared.dyn")
                acc = T.alloc_buffer(({TN // 2},), "float32", scope="local")
                xv = T.alloc_buffer(({xs * VEC},), "float16", scope="local")
                wv = T.alloc_buffer(({ws_ * P},), "uint32", scope="local")
                sv = T.alloc_buffer(({ws_ * P},), "uint32", scope="local")
                zv = T.alloc_buffer(({ws_ * P},), "uint32", scope="local")
                for i in T.unroll({TN // 2}):
                    acc[i] = T.float32(0)
{prologue}
                for ko in T.serial({KT}):
{loop}
                for j in T.unroll({NJ}):
                    for c in T.unroll(4):
                        if {row} < {M}:
                            {store}
{sum_kernel}'''


def plan_kernel(func, target, profile, tile=None, plan_m: int | None = None,
                gated_ok: bool = False) -> tuple:
    """What both wgmma kernels check and choose: ``(schedule, func, roles, TM, TN, K split)``,
    or :class:`MatchError` (not sm_90a, not 4-bit, a tile that does not divide the matrix).
    ``tile``: ``(TM, TN[, KS])`` (default :data:`TILE`, K split by :func:`choose_split` for a
    prompt of ``plan_m`` tokens, default :data:`.gpu_gemm_mma.PLAN_M`; never for a gated
    epilogue, which only a caller passing ``gated_ok`` takes: see
    :func:`.gpu_gemm_mma.match_gemm`)."""
    if not wgmma_supported(target):
        raise MatchError("wgmma needs a CUDA sm_90a target")
    sch = s_tir.Schedule(func)
    func = sch.mod["main"]
    g = mma_gemm.match_gemm(sch, profile, gated_ok)
    if g["fmt"] not in ("e0m4", "int4"):
        raise MatchError("the wgmma kernels take 4-bit weights")
    TM, TN = (tile or TILE)[:2]
    if TM % 64 or TN not in (64, 128, 192, 256) or g["n"] % TN or g["k"] % TK:
        raise MatchError(f"tile {TM}x{TN} does not divide N={g['n']}, K={g['k']}")
    ks = tile[2] if tile is not None and len(tile) > 2 else 1 if g["gated"] else choose_split(
        plan_m or mma_gemm.PLAN_M, g["n"], g["k"], (TM, TN), profile.compute_units)
    if g["gated"] and ks > 1:
        raise MatchError("a gated epilogue needs K unsplit")
    if g["k"] % (TK * ks):
        raise MatchError(f"K={g['k']} does not split {ks} ways")
    return sch, func, g, TM, TN, ks


def finish_kernel(src: str, helpers: dict, sch, func, g, shared: int, label: str):
    """The kernel parsed from ``src``, its epilogue attached, tagged ``tvm_lite.gemm = label``,
    as a :class:`tvm.s_tir.Schedule`; :class:`MatchError` when it needs more than
    :data:`SHARED_MAX` bytes of shared memory."""
    if shared > SHARED_MAX:
        raise MatchError(f"{label} needs {shared} bytes of shared memory; a workgroup may have "
                         f"{SHARED_MAX}")
    kernel = from_source(src, extra_vars={"T": T, "HELPERS": helpers})
    kernel = attach_epilogue(kernel, func, sch, g["out_dtype"], g["final"], g["matmul_buf"])
    attrs = {k: v for k, v in func.attrs.items()} if func.attrs is not None else {}
    return s_tir.Schedule(kernel.with_attrs({**attrs, "tvm_lite.gemm": label}))


def wgmma_gemm_kernel(func, target, profile, tile=None, x_stages: int | None = None):
    """The wgmma kernel for ``func`` as a :class:`tvm.s_tir.Schedule`, or raise
    :class:`MatchError` where it does not apply (``tile``: see :func:`plan_kernel`;
    ``x_stages``: see :func:`kernel_source`, default :data:`X_STAGES`)."""
    x_stages = X_STAGES if x_stages is None else x_stages
    if x_stages == 1 or x_stages > 5:
        raise MatchError(f"x_stages={x_stages}: 0 (registers) or 2 to 5 cp.async slices")
    sch, func, g, TM, TN, ks = plan_kernel(func, target, profile, tile)
    shared = (TK // 8) * (max(2, x_stages) * ((TM // 8) * SBO + X_LBO_SKEW) + 2 * (TN // 8) * SBO)
    return finish_kernel(kernel_source(func, g, (TM, TN, ks), x_stages), HELPERS, sch, func, g,
                         shared, "wgmma_m64n%dk16 %dx%d split-K %d x%s"
                         % (TN, TM, TN, ks, x_stages or "regs"))


__all__ = ["wgmma_gemm_kernel", "wgmma_supported", "kernel_source", "HELPERS", "TILE"]
