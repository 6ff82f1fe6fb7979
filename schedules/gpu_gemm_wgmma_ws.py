"""Prefill GEMM on Hopper with warp specialisation: one warpgroup stages, the others multiply.

The kernel of :mod:`.gpu_gemm_wgmma` (4-bit ``W``, ``wgmma`` from shared memory, the same
layouts) with the work split by role instead of every thread doing both. In that kernel each
thread loads, dequantizes and stores its share of the next slice and then meets the whole
workgroup at a barrier, once per 64 of K; on the H200 it ran no faster than the mma.sync kernel
although its tensor cores are twice as fast. Here:

* **producer** -- warpgroup 0 (128 threads) copies slices of X and of the *packed* weight (codes,
  scales, zeros) by ``cp.async`` into a ring of ``S`` stages, ``S - 1`` slices ahead; for slice
  ``k`` it waits for its own copies, meets the other producers (named barrier ``P``), dequantizes
  the packed slice into the stage's fp16 W (K-major, as the wgmma kernel), fences the stores to
  the async proxy and *arrives* at ``FULL[k % S]``; then it waits at ``EMPTY`` for the stage the
  consumers finished last and refills it;
* **consumers** -- warpgroups 1 .. ``TM / 64`` wait at ``FULL``, issue the slice's ``TK / 16``
  wgmma, keep one slice of MMAs in flight (``wgmma.wait_group 1``) and *arrive* at ``EMPTY`` for
  the slice before.

``bar.sync`` / ``bar.arrive`` are the hardware's named barriers (ids 1 .. 2 S + 1; 0 is
``__syncthreads``): an arrive does not wait, so the producer runs up to ``S - 1`` slices ahead
and the consumers never wait for a load that was issued in time. Every arrive has its wait:
the consumers release only the slices whose stage is refilled.

What it takes: what :func:`.gpu_gemm_wgmma.wgmma_gemm_kernel` takes, with a quantization group
that divides the 64-deep slice or is a multiple of it.
"""

from __future__ import annotations

from tvm import s_tir

from . import cuda_cluster
from . import gpu_gemm_mma as mma_gemm
from . import gpu_gemm_wgmma as wg
from .cuda_mma import HELPERS as MMA_HELPERS
from .cuda_mma import call
from .gpu_gemv import CODES_PER_WORD, MatchError
from .gpu_gemv_half2 import E0M4_ZERO_NONE

cuda_cluster.register()  # __cluster_dims__ for the kernels that ask (cluster_sum)

PRODUCER = 128  # threads of the producer warpgroup
NAMED_BARRIERS = 16  # a workgroup's hardware barriers (bar.sync ids 0 .. 15)
STAGES = 4  # slices in the ring
# GPUPrefillGEMM takes this kernel by default on sm_90a for a deep GEMM, K >= DEEP_K_RATIO x N
# with N >= DEEP_MIN_N (the down projections), and for a wide one, N >= WIDE_N_RATIO x K
# (gate/up), each with its tile, stages, fp16 W slices, paired stores and X copy. Measured on
# the H200 at M = 512 against the mma.sync kernel (``bench.prefill --parts gemm --gemm-variants
# "e0m4,e0m4 (sm_90a)" --wgmma ...``): session 15, Llama-1B's down (K 8192, N 2048) 78.5 ->
# 72.6 us at ws3, Gemma-2B's (K 16384) 143.8 -> 124.9 us; session 18
# (``results/issue16_prefill_gemm_ws_s18.json``, ``..._defaults_s18.json``): Llama-1B's down
# 77.9 -> 70.0 us at ws4w2 and 68.4 with X copied by rows (ws3 71.5), Gemma-2B's 142.5 -> 121.9
# and 116.8; gate/up (K 2048, N 8192 and 16384) 66.4 -> 60.2 and 126.5 -> 113.6 us at ws5w2p
# (ws3 69.9: the paired stores make the difference; X by rows no better). q (K = N) stays with
# mma.sync (3-12% slower here), and so do k and v alone (K 2048, N 256-512: 1.7-2.5x slower,
# hence DEEP_MIN_N; the pipeline merges them with q anyway). Session 24, an H100
# (``results/issue16_gemm_staged_pdlg_h100_s24.json``): outputs staged through shared memory
# took Llama-1B's merged gate+up (K 2048, N 16384) from 57.8 to 51.7 us at M = 256 and from
# 113.1 to 106.1 at M = 512, so the wide GEMMs stage them. Down is unchanged: at these
# lengths its plan splits K, and a split tile stages nothing (that run's 5-stage variant,
# without X copied by rows, took 45.6 and 72.7 us against the default's 45.5 and 69.2).
DEEP_K_RATIO = 4
DEEP_MIN_N = 2048
DEEP_TILE = (128, 256)
DEEP_STAGES = 4
DEEP_W_BUFFERS = 2
DEEP_PAIR_STORES = False
DEEP_X_ROWS = True
WIDE_N_RATIO = 4
WIDE_TILE = (128, 256)
WIDE_STAGES = 5
WIDE_W_BUFFERS = 2
WIDE_PAIR_STORES = True  # (where staged stores do not apply)
WIDE_X_ROWS = False
WIDE_STAGED_STORES = True
# Parts of the kernel a diagnostic build leaves out (``ablate``; ``bench.prefill --wgmma
# 128x256xws3-dequant``): the producer's copies after the first S - 1 slices, its dequant, the
# consumers' wgmma, the output stores. Such a kernel computes a wrong result; its time says which
# part bounds the whole (a part whose removal does not speed it up is not the bound).
ABLATIONS = ("copy", "dequant", "mma", "store")
# X copied a row segment a warp quarter (``x_rows``): 8 threads copy the 8 16-byte vectors of
# one row of a 64-deep slice, so a warp reads 4 whole 128-byte lines of X where the pair mapping
# reads 32 bytes of each of 16 rows (ncu on the H200, session 18: the pair mapping's cp.async
# took 8x the ideal L1 wavefronts, 40% of the kernel's shared-memory wavefronts). The 8 vectors
# of a row land in 8 core matrices adjacent in K, XL apart; XL = 16 mod 128 (this skew) puts
# them in 8 different bank groups.
X_ROWS_LBO_SKEW = 16
# Outputs staged through shared memory (``staged_stores``): once every consumer is done with the
# ring, each warp writes its 16 rows of fp16 outputs to shared memory (rows STAGE_PAD bytes
# longer than the tile, so a warp's 4-byte writes of 8 rows x 4 column pairs hit 32 different
# banks) and stores them back a row segment at a time, 16 bytes a thread: a warp writes whole
# 512-byte rows of the output where the paired stores write 4 bytes at 8 rows.
STAGE_PAD = 16
# K split, its partials summed in a cluster (``cluster_sum``): the KS workgroups of an output
# tile run as one thread-block cluster (:mod:`.cuda_cluster`); each leaves its fp32 partials in
# its own shared memory (rows CLUSTER_PAD bytes longer than the tile, as STAGE_PAD), and each
# then adds up TM / KS of the tile's rows across the cluster and stores them through the
# epilogue. No fp32 partials in global memory, no second kernel. CLUSTER_MAX: the portable
# cluster size. The down projection (a deep GEMM) keeps its sum kernel: in clusters of 8 at 256
# tokens and of 4 at 512 it took 63.9 and 109.3 us against 45.2 and 69.1 (H100, twenty-eighth
# session, ``results/issue16_gemm_down_clusters_h100_s28.json``).
CLUSTER_PAD = 16
CLUSTER_MAX = 8
# A split K's fp32 partials (summed by the second kernel) stored in pairs: each consumer thread
# writes its two neighbouring columns of a row in one 8-byte store (``tvm_lite_st_f32x2``), so
# the four threads of a row fill one 32-byte sector where two 4-byte stores each half-filled it.
# Half the store instructions. The down projections split K at 256 and 512 tokens and write
# 16.8 MB of partials a call (Llama-1B and Gemma-2B, K in 8 and in 4), all workgroups at the end
# of one wave; ncu on the unsplit 2048-token kernel (fortieth session) found its scalar stores
# using 8 of each sector's 32 bytes. Off until timed (``bench.prefill --parts gemm
# --gemm-layers down --gemm-switch pp:schedules.gpu_gemm_wgmma_ws.PAIR_PARTIALS=True``).
PAIR_PARTIALS = False
# The dequant shared with the consumers: each consumer thread dequantizes this many of a slice's
# 16-byte packed vectors (the producer threads the rest), writing them while the previous
# slice's wgmmas run, where the consumers otherwise wait at FULL for the producer (ncu on
# Llama-1B's down at 2048 tokens, fortieth session: the rule's kernel 247 us, the same without
# its copies and dequant 115; 60% of the warps' stalls at a barrier; one producer warp a
# scheduler issuing the dequant of a whole slice). A slice of 128 x 256 has 512 vectors: 1 a
# consumer (256 threads) leaves 2 a producer (128) instead of 4. 0: the producer dequantizes
# them all (the kernel before). Off until timed (``bench.prefill --parts gemm --wgmma
# 128x256xws4w2rd1`` or ``--gemm-switch cd:schedules.gpu_gemm_wgmma_ws.CONSUMER_UNITS=1``).
CONSUMER_UNITS = 0
# A deep or wide GEMM takes this kernel only at the planned prompt lengths where its grid, K split
# included, gives at least mma_gemm.MIN_WAVE of the SMs a workgroup; at the others, mma.sync's
# plan for that length (one branch each, as the mid GEMMs). H100, twenty-eighth session
# (``bench.prefill --parts gemm --gemm-models smollm2-135m --gemm-lengths 256,2048
# --gemm-variants "e0m4,e0m4 (sm_90a)"``, ``results/issue16_gemm_smollm2_h100_s28.json``):
# SmolLM2's gate+up (K 576, N 3072) at M = 256 gets 24 workgroups of 128 x 256 (K too short to
# split): 17.1 us, against mma.sync's 64 x 64 tiles (192 workgroups) 11.8; at M = 2048 (192
# workgroups) this kernel 31.8, mma.sync 50.4. Llama-1B's and Gemma-2B's fill the SMs at every
# planned length and keep this kernel.
DEEP_WIDE_FILL_SMS = True
# A mid GEMM (neither deep nor wide, N >= K: the merged q+k+v, o) takes this kernel, its K split
# in two and summed in clusters of two, at a planned prompt length where a TM x TN tile (TM from
# MID_TMS, tallest first; TN from MID_TNS, widest first) gives a grid that the split makes fill
# the SMs in one wave (from MIN_WAVE of them to all); at other lengths the mma.sync kernel's plan
# (:func:`mid_gemm_kernel`).
# Measured on an H100 (session 25, ``bench.prefill --parts gemm --wgmma 128x192xws4c,...``,
# ``results/issue16_gemm_cluster_sum_h100_s25.json``), Llama-1B at M = 512: the merged q+k+v (K
# 2048, N 3072) 44.7 -> 25.8 us (0.32x -> 0.56x torch; the same kernel with a sum kernel: 39.5), o
# (N 2048, 128x128 ws4w2rc) 30.4 -> 24.3. Clusters of four and eight lost to the sum kernel: q+k+v
# at M = 256 (K split 4 ways) 28.6 -> 31.8 us, o 21.4 -> 28.0, down at 512 68.9 -> 109.8 (a
# workgroup of ~200 KB of shared memory fills its SM, and a GPC's SMs hold fewer clusters of four
# or eight than the grid asks for at once: a second wave). 64-row tiles (session 26, H100,
# ``--gemm-lengths 256 --wgmma 64x192xws4c,64x128xws4c,64x256xws4c``,
# ``results/issue16_gemm_cluster_sum_h100_s26.json``) at M = 256, pairs again: q+k+v 27.4 -> 19.5
# us (64x192; torch 14.3), o 22.0 -> 16.6 (64x128; torch 14.1); 64x256 needs clusters of four
# there and lost (25.6, 25.4), and so did down (45.0 -> 54.5 at 64x128, not a mid GEMM).
MID_CLUSTER_SUM = True
MID_TMS = (128, 64)
MID_TNS = (256, 192, 128)
MID_STAGES = 4
MID_SPLIT = 2
# ... and, with MID_TWO_A_SM, a tile whose split grid is up to twice the SMs where two of its
# workgroups fit a SM's shared memory (SM_SHARED) with MID_TWO_A_SM_STAGES stages: Gemma-2B's
# merged q+k+v (K 2048, N 2560) at 256 tokens gets no tile above (64 x 128 split in two is 160
# workgroups of 133 KB at 4 stages), so it runs mma.sync's 64 x 64 (27 us a call in the chunks,
# 2.1x one call's time a row); at 3 stages 64 x 128 takes 100 KB, two a SM. It changes no other
# plan of Llama-1B, Gemma-2B or SmolLM2 at 256, 512 or 2048 tokens. On an H100 (twenty-ninth
# session, ``bench.prefill --parts gemm --gemm-models gemma-2b --gemm-lengths 256 --gemm-layers
# "q+k+v;o" --gemm-variants "e0m4 (sm_90a)" --wgmma 64x128xws4c,64x128xws3c``,
# ``results/issue16_gemm_gemma_mid_h100_s29.json``): Gemma-2B's q+k+v 27.2 -> 25.5 us (64x128xws4c
# 31.2; torch 15.2; max error against torch 3.3e-4, as the default's), ~0.25 ms of its 8
# chunks. Off: the mma.sync plan Gemma-2B's q+k+v falls back to now takes K in two, summed in
# clusters (``gpu_gemm_mma.UNSPLIT_CLUSTER_WAYS``), 20.8 us on an H100 in the thirty-first
# session (26.9 unsplit; ``results/issue16_gemm_256_tiles_h100_s31.json``), against this
# plan's 25.5 in the twenty-ninth (another run: not timed side by side).
MID_TWO_A_SM = False
MID_TWO_A_SM_STAGES = 3
SM_SHARED = 228 * 1024  # shared memory of an sm_90 SM (1 KB of it reserved a workgroup)

HELPERS = {
    **wg.HELPERS,
    "tvm_lite_bar_sync": r"""
__forceinline__ __device__ void tvm_lite_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory");
}
""",
    "tvm_lite_bar_arrive": r"""
__forceinline__ __device__ void tvm_lite_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(count) : "memory");
}
""",
    "tvm_lite_wgmma_wait1": r"""
__forceinline__ __device__ void tvm_lite_wgmma_wait1() {
  asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
}
""",
    # two neighbouring outputs in one 4-byte store (pair_stores), partials in one 8-byte one
    "tvm_lite_st_f16x2": MMA_HELPERS["tvm_lite_st_f16x2"],
    "tvm_lite_st_f32x2": cuda_cluster.HELPERS["tvm_lite_st_f32x2"],
    **{name: MMA_HELPERS[name] for name in ("tvm_lite_st_v4", "tvm_lite_syncwarp",
                                            "tvm_lite_lds_v4")},
}


def store_modes(g: dict, ks: int, pairs: bool, staged: bool) -> tuple[bool, bool]:
    """(paired stores, staged stores) as taken: both only where the output is fp16 with no
    epilogue (or a gated one: staged only) and K is not split; staged ones in place of pairs."""
    fp16 = ks == 1 and str(g["out_dtype"]) == "float16"
    if g["gated"]:
        return False, staged and fp16
    plain = g["final"] is None and fp16
    return pairs and plain and not staged, staged and plain


def x_skew(x_rows: bool) -> int:
    """Bytes X's core matrices adjacent in K sit off a multiple of 128 (see ``x_rows``)."""
    return X_ROWS_LBO_SKEW if x_rows else wg.X_LBO_SKEW


def shared_bytes(g: dict, TM: int, TN: int, stages: int, w_buffers: int | None = None,
                 x_rows: bool = False) -> int:
    """Bytes of shared memory a workgroup uses: per stage X and the packed slice, and
    ``w_buffers`` (default: one a stage) fp16 W slices."""
    XS = (wg.TK // 8) * ((TM // 8) * wg.SBO + x_skew(x_rows))
    WS = (wg.TK // 8) * (TN // 8) * wg.SBO
    RG = max(1, wg.TK // g["group"])
    RS = (wg.TK // CODES_PER_WORD) * TN * 2 + RG * TN * 2 * (2 if g["fmt"] == "e0m4" else 1)
    return stages * (XS + RS) + (w_buffers or stages) * WS


def producer_units(TM: int, TN: int, consumer_units: int) -> int:
    """16-byte packed vectors of a ``TM x TN`` slice each producer thread dequantizes when each
    consumer thread takes ``consumer_units``; 0 where that leaves the producers no whole,
    nonzero share (:data:`CONSUMER_UNITS`)."""
    units = (wg.TK // CODES_PER_WORD) * (TN // wg.VEC)
    left = units - consumer_units * PRODUCER * (TM // 64)
    return left // PRODUCER if left > 0 and left % PRODUCER == 0 else 0


def cluster_bytes(TM: int, TN: int) -> int:
    """Bytes of shared memory a tile's fp32 partials take (``cluster_sum``)."""
    return TM * (TN * 4 + CLUSTER_PAD)


def check_group(g: dict) -> None:
    """:class:`MatchError` unless the quantization group divides, or is a multiple of, a
    slice."""
    if wg.TK % g["group"] and g["group"] % wg.TK:
        raise MatchError(f"quantization group {g['group']} neither divides nor is a multiple "
                         f"of the {wg.TK}-deep slice")


def plan_label(TM: int, TN: int, k_split: int, stages: int, wn=None, pairs=False, x_rows=False,
               staged=False, cluster=False, consumer_units: int = 0) -> str:
    """The ``tvm_lite.gemm`` label of this kernel at a tile, split and staging."""
    return ("wgmma_m64n%dk16 %dx%d split-K %d warp-specialised x%d%s%s%s%s%s%s"
            % (TN, TM, TN, k_split, stages, f" w{wn}" if wn else "", " pairs" if pairs else "",
               " x rows" if x_rows else "", " staged" if staged else "",
               " cluster" if cluster else "",
               f" consumers dequant {consumer_units}" if consumer_units else ""))


def cp_async(dst: str, src: str) -> str:
    """TVMScript of one 16-byte ``cp.async`` to byte offset ``dst`` of the kernel's ``sm``."""
    return f"T.evaluate({call('tvm_lite_cp_async16', f'T.address_of(sm[({dst}) // 2])', f'T.address_of({src})')})"


def issue_slice(k: str, slot: str, g: dict, x: str, xbuf, tile, kn: str, XS: int, XL: int,
                RB: int, RS: int, x_rows: bool, pitch: int | None = None) -> str:
    """The producer's copies of K slice ``k`` into stage ``slot`` (rows of X past M: zeros):
    X's ``TM`` rows K-major in core matrices (``XS`` bytes a stage, ``XL`` between core
    matrices adjacent in K), then at byte ``RB + slot * RS`` the packed slice -- its ``TK / 4``
    rows of codes, its scale rows and (E0M4) zero rows, each ``pitch`` bytes apart (default
    ``TN * 2``: rows back to back). ``kn``: the slice's index template (``{k}``)."""
    TM, TN, _ = tile
    TK, VEC, SBO, PT = wg.TK, wg.VEC, wg.SBO, PRODUCER
    M, G = g["m"], g["group"]
    pitch = pitch or TN * 2
    RG = max(1, TK // G)
    CB, GB = (TK // CODES_PER_WORD) * pitch, RG * pitch  # bytes: packed codes, scales
    kk = kn.format(k=k)
    xs = TM * TK // VEC // PT
    e = f"(l * {PT} + tx)"
    if x_rows:  # the TK // VEC vectors of a row to neighbouring threads
        xm, xk = f"({e} // {TK // VEC} % {TM})", f"({e} % {TK // VEC})"
    else:  # two threads a row, TM rows before the next pair of vectors
        xm, xk = f"({e} // 2 % {TM})", f"(({e} // {2 * TM}) * 2 + {e} % 2)"
    x_dst = f"({slot}) * {XS} + {xk} * {XL} + {xm} // 8 * {SBO} + {xm} % 8 * 16"
    x_src = f"{x}[{mma_gemm._row_at(xbuf, f'by * {TM} + {xm}', f'{kk} * {TK} + {xk} * {VEC}')}]"
    vecs = TN // VEC  # 16-byte vectors of a packed row (8 columns each)
    cs = (TK // CODES_PER_WORD) * vecs // PT
    ce = f"(l * {PT} + tx)"
    c_dst = f"{RB} + ({slot}) * {RS} + {ce} // {vecs} * {pitch} + {ce} % {vecs} * 16"
    c_src = (f"codes32[{kk} * {TK // CODES_PER_WORD} + {ce} // {vecs}, "
             f"bx * {TN // 2} + {ce} % {vecs} * 4]")
    lines = [f"for l in T.unroll({xs}):",
             f"    if by * {TM} + {xm} < {M}:",
             f"        {cp_async(x_dst, x_src)}",
             "    else:",
             f"        sm[T.Ramp(({x_dst}) // 2, 1, {VEC})] = T.Broadcast(T.float16(0), {VEC})",
             f"for l in T.unroll({cs}):",
             f"    {cp_async(c_dst, c_src)}"]
    groups = [("scale32", CB)] + ([("zero32", CB + GB)] if g["fmt"] == "e0m4" else [])
    for view, off in groups:  # RG rows of TN scales (zeros): one vector a thread
        row = f"({kk} * {TK} // {G} + tx // {vecs})"
        dst = f"{RB} + ({slot}) * {RS} + {off} + tx // {vecs} * {pitch} + tx % {vecs} * 16"
        lines += [f"if tx < {RG * vecs}:",
                  f"    {cp_async(dst, f'{view}[{row}, bx * {TN // 2} + tx % {vecs} * 4]')}"]
    return "\n".join(lines)


def ev(name: str, *args) -> str:
    """TVMScript of a statement calling helper ``name``."""
    return f"T.evaluate({call(name, *args)})"


def producer_loop(issue, stages: int, slices: int, threads: int, ready: list,
                  ablate=()) -> list:
    """The producer warpgroup's statements: the copies of the first ``stages - 1`` slices, then
    a loop over the ``slices`` slices ``k`` that waits for slice k's copies, runs ``ready``
    (statements making the stage ready for the consumers: this kernel's dequant), fences the
    stage to the async proxy, arrives at ``FULL``, waits at ``EMPTY`` for the consumers to be
    done with slice ``k - 1`` and copies slice ``k + stages - 1`` into its stage (``issue(k,
    slot)``: the copies' statements). Barrier ids: ``FULL`` 1 .. S, ``EMPTY`` S + 1 .. 2 S."""
    S, KT = stages, slices
    FULL, EMPTY = 1, 1 + S
    indent = mma_gemm.indent
    commit = ev("tvm_lite_cp_async_commit")
    lines = []
    for i in range(S - 1):
        lines += [f"if {i} < {KT}:", indent(issue(str(i), str(i)), 4), commit]
    return lines + [
        f"for k in T.serial({KT}):",
        indent("\n".join([
            ev(f"tvm_lite_cp_async_wait_group{S - 2}"),
            *ready,
            ev("tvm_lite_fence_async_shared"),
            ev("tvm_lite_bar_arrive", f"T.Cast('int32', {FULL} + k % {S})", f"T.int32({threads})"),
            f"if k + {S - 1} < {KT}:",
            "    if k >= 1:",
            "        " + ev("tvm_lite_bar_sync", f"T.Cast('int32', {EMPTY} + (k - 1) % {S})",
                             f"T.int32({threads})"),
            "    T.evaluate(0)" if "copy" in ablate else
            indent(issue(f"(k + {S - 1})", f"(k + {S - 1}) % {S}"), 4),
            commit]), 4)]


def kernel_source(func, g: dict, tile, stages: int = STAGES, ablate=(),
                  w_buffers: int | None = None, pair_stores: bool = False,
                  x_rows: bool = False, staged_stores: bool = False,
                  cluster_sum: bool = False, consumer_units: int = 0) -> str:
    """TVMScript of the kernel (roles ``g`` from :func:`.gpu_gemm_mma.match_gemm`, ``tile =
    (TM, TN, KS)``); its stores write ``__tvm_lite_epilogue__(acc)``. ``ablate``: parts of
    :data:`ABLATIONS` to leave out (diagnostics only: the result is wrong). ``w_buffers``: fp16
    W slices in shared memory (default: one a stage; fewer -- 2 -- leave room for a deeper ring
    of X and packed slices, the copies ``stages - 1`` slices ahead: see :func:`ws_gemm_kernel`).
    ``pair_stores``: where the output is fp16 with no epilogue and K is not split, each thread
    stores its two neighbouring outputs of a row in one 4-byte store (``tvm_lite_st_f16x2``)
    instead of two 2-byte ones: half the store instructions, each still 8 rows of a warp.
    ``x_rows``: X copied a row segment a warp quarter (:data:`X_ROWS_LBO_SKEW`) instead of
    two threads a row. ``staged_stores``: where pairs could be stored, the outputs go through
    shared memory instead and leave 16 bytes a thread (:data:`STAGE_PAD`). ``cluster_sum``:
    where K is split, its partials are added up in a cluster (:data:`CLUSTER_PAD`) instead of
    by a second kernel. ``consumer_units``: 16-byte packed vectors of each slice a consumer
    thread dequantizes (:data:`CONSUMER_UNITS`; 0: the producer dequantizes them all)."""
    names, params, decls = mma_gemm._decl(func)
    TM, TN, KS = tile
    TK, VEC, SBO, h = wg.TK, wg.VEC, wg.SBO, 2
    K, N, M, G = g["k"], g["n"], g["m"], g["group"]
    x, out = names[g["roles"]["x"]], names[g["roles"]["out"]]
    xbuf, obuf = func.params[g["roles"]["x"]], func.params[g["roles"]["out"]]
    S, PT, CW = stages, PRODUCER, TM // 64
    WN = w_buffers or S  # fp16 W slices: slice k in W slot k % WN
    threads = PT * (1 + CW)
    FULL, EMPTY, PBAR = 1, 1 + S, 1 + 2 * S  # named barrier ids
    WFREE = 2 + 2 * S  # WN < S: WFREE + k % WN, the W slot of slice k free again
    XL = (TM // 8) * SBO + x_skew(x_rows)
    WL = (TN // 8) * SBO
    XS, WS = (TK // 8) * XL, (TK // 8) * WL
    RG = max(1, TK // G)  # scale / zero rows of a slice
    CB, GB = (TK // CODES_PER_WORD) * TN * 2, RG * TN * 2  # bytes: packed codes, scales
    RS = CB + GB * (2 if g["fmt"] == "e0m4" else 1)  # a stage's packed slice
    WB, RB = S * XS, S * XS + WN * WS  # byte offsets: fp16 W slots, packed slots
    KT = K // TK // KS
    kn = "(bz * %d + {k})" % KT if KS > 1 else "{k}"  # the K slice of this split
    warp, lane = "(tx // 32)", "(tx % 32)"
    indent = mma_gemm.indent

    def issue(k: str, slot: str) -> str:
        return issue_slice(k, slot, g, x, xbuf, (TM, TN, KS), kn, XS, XL, RB, RS, x_rows)

    # dequant of stage ``slot``'s packed slice into its fp16 W: as the wgmma kernel's store.
    # A slice has UNITS 16-byte packed vectors (8 columns of one packed row each); the producer
    # threads take the first ``ds`` a thread, the consumer threads ``consumer_units`` each.
    P = VEC // 2
    UNITS = (TK // CODES_PER_WORD) * (TN // VEC)
    CT = PRODUCER * CW  # consumer threads
    ds = producer_units(TM, TN, consumer_units)
    if not ds:
        raise MatchError(f"consumer_units={consumer_units}: {consumer_units} x {CT} consumer "
                         f"threads leave the {PT} producers no whole share of a slice's {UNITS} "
                         "packed vectors")

    def dequant_text(units: int, first: str, stride: int, thread: str) -> str:
        """Dequant of ``units`` vectors a thread: vector ``first + l * stride + thread``."""
        we = f"({first} + l * {stride} + {thread})" if first else f"(l * {stride} + {thread})"
        wgc = f"({we} % 8 + {we} // 16 % {TN // 64} * 8)"  # 8-column group
        wr = f"({we} // 16 // {TN // 64} * 2 + {we} // 8 % 2)"  # packed row of the slice
        grow = f"({wr} * {CODES_PER_WORD} // {G})" if G <= TK else "0"
        raw = f"{RB} + ({{slot}}) * {RS}"
        lds = lambda off: call("tvm_lite_lds_v4",  # noqa: E731
                               f"T.address_of(sm[({raw} + {off}) // {h}])", ret="uint32x4")
        zero_at = f"zv[l * {P} + p]" if g["fmt"] == "e0m4" else f"T.uint32({E0M4_ZERO_NONE})"
        w_off = (f"({WB} + ({{wslot}}) * {WS} + ({wr} // 2) * {WL} + {wgc} * {SBO} + p * 32"
                 f" + {wr} % 2 * 8) // {h}")
        dq = call("tvm_lite_dq_kmajor", f"T.address_of(sm[{w_off}])", f"wv[l * {P} + p]",
                  zero_at, f"sv[l * {P} + p]")
        lines = [f"for l in T.unroll({units}):",
                 f"    wv[T.Ramp(l * {P}, 1, {P})] = {lds(f'{wr} * {TN * 2} + {wgc} * 16')}",
                 f"    sv[T.Ramp(l * {P}, 1, {P})] = "
                 f"{lds(f'{CB} + {grow} * {TN * 2} + {wgc} * 16')}"]
        if g["fmt"] == "e0m4":
            lines.append(f"    zv[T.Ramp(l * {P}, 1, {P})] = "
                         f"{lds(f'{CB + GB} + {grow} * {TN * 2} + {wgc} * 16')}")
        lines += [f"    for p in T.unroll({P}):", f"        T.evaluate({dq})"]
        return "\n".join(lines)

    dequant = dequant_text(ds, "", PT, "tx")
    consumer_dequant = ("T.evaluate(0)" if "dequant" in ablate else
                        dequant_text(consumer_units, str(ds * PT), CT, f"(tx - {PT})")
                        .replace("{slot}", f"j % {S}").replace("{wslot}", f"j % {WN}"))

    producer = producer_loop(issue, S, KT, threads, [
        ev("tvm_lite_bar_sync", f"T.int32({PBAR})", f"T.int32({PT})"),
        *([f"if k >= {WN}:",  # the consumers are done with W slot k % WN's last slice
           "    " + ev("tvm_lite_bar_sync", f"T.Cast('int32', {WFREE} + k % {WN})",
                       f"T.int32({threads})")] if WN < S else []),
        "T.evaluate(0)" if "dequant" in ablate else
        dequant.replace("{slot}", f"k % {S}").replace("{wslot}", f"k % {WN}")], ablate)

    wgi = f"({warp} // 4 - 1)"  # consumer warpgroup
    a_addr = f"T.address_of(sm[(j % {S} * {XS} + kk * 2 * {XL} + {wgi} * 8 * {SBO}) // {h}])"
    b_addr = f"T.address_of(sm[({WB} + j % {WN} * {WS} + kk * 2 * {WL}) // {h}])"
    mma = call(f"tvm_lite_wgmma_m64n{TN}k16", "T.address_of(acc[0])", a_addr, b_addr,
               f"T.uint32({XL})", f"T.uint32({WL})")
    row = f"by * {TM} + {wgi} * 64 + {warp} % 4 * 16 + {lane} // 4 + c // 2 * 8"
    col = f"bx * {TN} + jn * 8 + {lane} % 4 * 2 + c % 2"
    cluster_sum = cluster_sum and KS > 1
    gated_locals = False  # the staged gated stores' registers (gate, up, output vectors)
    workspace, store, sum_kernel = mma_gemm.output_store(
        out, obuf, M, N, 1 if cluster_sum else KS, row, col, "acc[jn * 4 + c]")
    pair, staged_stores = store_modes(g, KS, pair_stores, staged_stores)
    PITCH = TN * 2 + STAGE_PAD  # bytes of a staged row
    stage_bar = 2 + 2 * S + (WN if WN < S else 0)  # the consumers' barrier before staging
    ring = S * (XS + RS) + WN * WS  # bytes of the ring and its W slots
    shared = ring
    after = []  # every thread's statements after both roles' (the cluster's sum)
    if cluster_sum:
        if stage_bar > NAMED_BARRIERS - 1:
            raise MatchError(f"cluster_sum needs named barrier {stage_bar}; the hardware has "
                             f"{NAMED_BARRIERS - 1} besides __syncthreads'")
        if KS > CLUSTER_MAX or TM % KS:
            raise MatchError(f"cluster_sum: K split {KS} ways over {TM} rows (at most "
                             f"{CLUSTER_MAX} workgroups a cluster, each an equal share of rows)")
        FP = cluster_bytes(1, TN)  # bytes of a row of fp32 partials
        shared = max(ring, TM * FP)
        lrow = f"({wgi} * 64 + {warp} % 4 * 16 + {lane} // 4 + hr * 8)"  # row in the tile
        st_at = f"T.address_of(sm[({lrow} * {FP} + (jn * 8 + {lane} % 4 * 2) * 4) // {h}])"
        stores = [  # the consumers: once all are done with the ring, partials to shared memory
            ev("tvm_lite_bar_sync", f"T.int32({stage_bar})", f"T.int32({threads - PT})"),
            f"for jn in T.unroll({TN // 8}):",
            "    for hr in T.unroll(2):",
            "        " + ev("tvm_lite_st_f32x2", st_at, "acc[jn * 4 + hr * 2]",
                            "acc[jn * 4 + hr * 2 + 1]")]
        RR, V4 = TM // KS, TN // 4  # rows this workgroup adds up; 16-byte vectors a row
        e = f"(it * {threads} + tx)"
        trow = f"(bz * {RR} + {e} // {V4})"  # the row of the tile
        at = f"T.address_of(sm[({trow} * {FP} + {e} % {V4} * 16) // {h}])"
        part = lambda r: call("tvm_lite_ld_dsmem_f32x4", at, r, ret="float32x4")  # noqa: E731
        gcol = f"bx * {TN} + {e} % {V4} * 4 + i"
        after = [
            ev("tvm_lite_cluster_sync"),  # every workgroup's partials in its shared memory
            f"for it in T.serial({-(-RR * V4 // threads)}):",
            f"    if {e} < {RR * V4}:",
            f"        tot[T.Ramp(0, 1, 4)] = {part('T.int32(0)')}",
            f"        for r in T.serial(1, {KS}):",
            f"            tot[T.Ramp(0, 1, 4)] = tot[T.Ramp(0, 1, 4)] + {part('r')}",
            f"        if by * {TM} + {trow} < {M}:",
            "            for i in T.unroll(4):",
            f"                {out}[{mma_gemm._row_at(obuf, f'by * {TM} + {trow}', gcol)}] = "
            f"{mma_gemm.EPILOGUE('tot[i]')}",
            ev("tvm_lite_cluster_sync")]  # no workgroup leaves while another reads it
    elif staged_stores:
        if TM * PITCH > ring:
            raise MatchError(f"staged stores: {TM} rows of {PITCH} bytes do not fit in the "
                             f"kernel's {ring} bytes of shared memory")
        if stage_bar > NAMED_BARRIERS - 1:
            raise MatchError(f"staged stores need named barrier {stage_bar}; the hardware has "
                             f"{NAMED_BARRIERS - 1} besides __syncthreads'")
        VR = TN // VEC  # 16-byte vectors of a staged row
        if g["gated"]:  # a vector of output: a gate vector and the up vector after it
            VR //= 2
        RPI = max(1, 32 // VR)  # rows a warp stores an instruction
        lrow = f"({wgi} * 64 + {warp} % 4 * 16 + {lane} // 4 + hr * 8)"  # row in the tile
        st_at = f"T.address_of(sm[({lrow} * {PITCH} + (jn * 8 + {lane} % 4 * 2) * 2) // {h}])"
        brow = f"({wgi} * 64 + {warp} % 4 * 16 + rr * {RPI} + {lane} // {VR})"
        gcol = f"bx * {TN} + {lane} % {VR} * {VEC}"
        back = call("tvm_lite_lds_v4", f"T.address_of(sm[({brow} * {PITCH} + {lane} % {VR} * 16)"
                    f" // {h}])", ret="uint32x4")
        grow = mma_gemm._row_at(obuf, f"by * {TM} + {brow}", gcol)
        store = ev("tvm_lite_st_v4", f"T.address_of({out}[{grow}])", back)
        if g["gated"]:  # act(gate) * up, 8 columns a thread, stored as one vector
            gated_locals = True
            at = f"({brow} * {PITCH} + {lane} % {VR} * 32) // {h}"  # gate; up 8 columns on
            ocol = f"T.Ramp(bx * {TN // 2} + {lane} % {VR} * {VEC}, 1, {VEC})"
            fp32 = lambda b: f'T.Cast("float32", {b}[i])'  # noqa: E731
            store = "\n        ".join([
                f"gh[T.Ramp(0, 1, {VEC})] = sm[T.Ramp({at}, 1, {VEC})]",
                f"uh[T.Ramp(0, 1, {VEC})] = sm[T.Ramp({at} + {VEC}, 1, {VEC})]",
                f"for i in T.unroll({VEC}):",
                f"    oh[i] = {mma_gemm.EPILOGUE_GATED(fp32('gh'), fp32('uh'))}",
                f"{out}[{mma_gemm._row_at(obuf, f'by * {TM} + {brow}', ocol)}] = "
                f"oh[T.Ramp(0, 1, {VEC})]"])
        stores = [
            ev("tvm_lite_bar_sync", f"T.int32({stage_bar})", f"T.int32({threads - PT})"),
            f"for jn in T.unroll({TN // 8}):",
            "    for hr in T.unroll(2):",
            "        " + ev("tvm_lite_st_f16x2", st_at, "acc[jn * 4 + hr * 2]",
                            "acc[jn * 4 + hr * 2 + 1]"),
            ev("tvm_lite_syncwarp"),
            f"for rr in T.unroll({16 // RPI}):",
            # (lanes past the warp's RPI rows -- where 32 is not a multiple of a row's
            # vectors, e.g. 192 columns -- would store the next warp's rows, unsynchronised)
            f"    if by * {TM} + {brow} < {M}"
            + (f" and {lane} < {RPI * VR}" if RPI * VR < 32 else "")
            + (" and acc[0] == T.float32(3.0e38):" if "store" in ablate else ":"),
            "        " + store]
    elif g["gated"]:
        raise MatchError("a gated epilogue is stored through shared memory (staged stores) "
                         "with K unsplit")
    elif pair or (KS > 1 and PAIR_PARTIALS):
        # columns (c, c + 1) in one store, rows g and g + 8 a thread: 4 bytes of fp16 outputs,
        # or 8 of a split's fp32 partials
        prow = row.replace("c // 2", "hr")
        pcol = col.replace(" + c % 2", "")
        at = (f"ws[(bz * {M} + {prow}) * {N} + {pcol}]" if KS > 1 else
              f"{out}[{mma_gemm._row_at(obuf, prow, pcol)}]")
        pst = ev("tvm_lite_st_f32x2" if KS > 1 else "tvm_lite_st_f16x2", f"T.address_of({at})",
                 "acc[jn * 4 + hr * 2]", "acc[jn * 4 + hr * 2 + 1]")
        stores = [f"for jn in T.unroll({TN // 8}):",
                  "    for hr in T.unroll(2):",
                  f"        if {prow} < {M}" + (" and acc[jn * 4 + hr * 2] == T.float32(3.0e38):"
                                               if "store" in ablate else ":"),
                  f"            {pst}"]
    else:
        stores = [
            f"for jn in T.unroll({TN // 8}):",
            "    for c in T.unroll(4):",
            # (an ablated store: a condition the compiler cannot prove false, never true here)
            f"        if {row} < {M}" + (f" and acc[jn * 4 + c] == T.float32(3.0e38):"
                                         if "store" in ablate else ":"),
            f"            {store}"]
    # With a consumers' share of the dequant: after FULL (the producer's share of slice j and
    # its copies are in), each consumer writes its share of slice j into W slot j % WN while
    # slice j - 1's wgmmas run, fences them and meets the other consumers (the staging barrier,
    # consumers only) before the MMAs; after its wait for slice j - 1's MMAs it meets them
    # again, so that no consumer writes W slot (j + 1) % WN while another still reads it.
    if consumer_units and stage_bar > NAMED_BARRIERS - 1:
        raise MatchError(f"consumer_units needs named barrier {stage_bar}; the hardware has "
                         f"{NAMED_BARRIERS - 1} besides __syncthreads'")
    meet = ev("tvm_lite_bar_sync", f"T.int32({stage_bar})", f"T.int32({CT})")
    share = ([indent(consumer_dequant, 4), "    " + ev("tvm_lite_fence_async_shared"),
              "    " + meet] if consumer_units else [])
    consumer = "\n".join([
        f"for i in T.unroll({TN // 2}):",
        "    acc[i] = T.float32(0)",
        f"for j in T.serial({KT}):",
        "    " + ev("tvm_lite_bar_sync", f"T.Cast('int32', {FULL} + j % {S})", f"T.int32({threads})"),
        *share,
        "    " + ev("tvm_lite_wgmma_fence"),
        f"    for kk in T.unroll({TK // 16}):",
        f"        T.evaluate({0 if 'mma' in ablate else mma})",
        "    " + ev("tvm_lite_wgmma_commit"),
        "    " + ev("tvm_lite_wgmma_wait1"),
        f"    if j >= 1 and j - 1 + {S} < {KT}:",
        "        " + ev("tvm_lite_bar_arrive", f"T.Cast('int32', {EMPTY} + (j - 1) % {S})",
                         f"T.int32({threads})"),
        *([f"    if j >= 1 and j - 1 + {WN} < {KT}:",
           "        " + ev("tvm_lite_bar_arrive", f"T.Cast('int32', {WFREE} + (j - 1) % {WN})",
                          f"T.int32({threads})")] if WN < S else []),
        *(["    " + meet] if consumer_units else []),
        ev("tvm_lite_wgmma_wait0"),
        *stores])
    head = mma_gemm.kernel_head("gemm_wgmma_ws", params, decls, mma_gemm.packed_views(names, g),
                                workspace, (N // TN, KS, f"({M} + {TM - 1}) // {TM}", threads))
    mark = [ev(cuda_cluster.marker((1, 1, KS)))] if cluster_sum else []
    sums = ['tot = T.alloc_buffer((4,), "float32", scope="local")'] if cluster_sum else []
    sums += [f'{v} = T.alloc_buffer(({VEC},), "float16", scope="local")'
             for v in ("gh", "uh", "oh")] if gated_locals else []
    return f'''{head}
                sm = T.alloc_buffer(({shared // h},), "float16", scope="shared.dyn")
                acc = T.alloc_buffer(({TN // 2},), "float32", scope="local")
{indent(chr(10).join(sums), 16)}
                wv = T.alloc_buffer(({max(ds, consumer_units) * P},), "uint32", scope="local")
                sv = T.alloc_buffer(({max(ds, consumer_units) * P},), "uint32", scope="local")
                zv = T.alloc_buffer(({max(ds, consumer_units) * P},), "uint32", scope="local")
{indent(chr(10).join(mark), 16)}
                if tx < {PT}:
{indent(chr(10).join(producer), 20)}
                else:
{indent(consumer, 20)}
{indent(chr(10).join(after), 16)}
{sum_kernel}'''


def mma_variant(func, g: dict, tile, cond, target, helpers: dict) -> tuple:
    """A planned length's branch that takes the mma.sync kernel at ``tile``: ``(cond, source,
    label)``, its helpers added to ``helpers`` (its split K summed in a cluster where
    :data:`.gpu_gemm_mma.CLUSTER_SUM` is on)."""
    cluster = mma_gemm.sums_in_cluster(tile, target)
    helpers.update(mma_gemm.helpers_for([tile[4]] if cluster else []))
    return (cond, mma_gemm.kernel_source(func, g, tile, cluster_sum=cluster),
            mma_gemm.plan_label(tile, cluster, mma_gemm.prefetch_of(g, tile)))


def ws_gemm_kernel(func, target, profile, tile=None, stages: int = STAGES, ablate=(),
                   w_buffers: int | None = None, pair_stores: bool = False,
                   x_rows: bool = False, staged_stores: bool = False, lengths=None,
                   cluster_sum: bool = False, fill_sms: bool = False,
                   consumer_units: int | None = None):
    """The warp-specialised kernel for ``func`` as a :class:`tvm.s_tir.Schedule`, or raise
    :class:`MatchError` where it does not apply (``tile``: see
    :func:`.gpu_gemm_wgmma.plan_kernel`; ``ablate``, ``pair_stores``, ``x_rows``,
    ``staged_stores``: see :func:`kernel_source`).

    ``w_buffers`` (2 .. ``stages``; default ``stages``): the fp16 W slices the producer
    dequantizes into. The ring of X and packed slices holds ``stages``; the copies of slice
    ``k + stages - 1`` start once the consumers are done with slice ``k - 1``, so their latency
    may be as long as ``stages - 1`` slices of MMAs. With one W slice a stage that is 3 stages
    at 128 x 256 (66 KB a stage); with 2 W slices the ring can hold 5 (214 KB). The hardware's
    16 named barriers bound ``stages`` (2 a stage, one for the producers, one a W slot where
    there are fewer W slots than stages; id 0 is ``__syncthreads``). ``lengths``: where the
    tile gives no K split, the prompt lengths the split is planned for (default
    :data:`.gpu_gemm_mma.PLAN_LENGTHS`: see :func:`.gpu_gemm_mma.lengths_for`).
    ``cluster_sum``: a split K's partials added up in a thread-block cluster (see
    :func:`kernel_source`). ``fill_sms``: at a planned length where the grid (K split included)
    gives fewer than ``MIN_WAVE`` of the SMs a workgroup, mma.sync's plan for that length instead
    (:data:`DEEP_WIDE_FILL_SMS`); :class:`MatchError` if that is every length.
    ``consumer_units``: see :func:`kernel_source` (default :data:`CONSUMER_UNITS` where it
    leaves the producers a whole share of the tile's slice, else 0)."""
    if not 2 <= stages <= 5 and not (w_buffers and w_buffers < stages <= 6):
        raise MatchError(f"stages={stages}: 2 to 5 (6 with fewer W buffers)")
    if w_buffers is not None and not 2 <= w_buffers <= stages:
        raise MatchError(f"w_buffers={w_buffers}: 2 to stages={stages}")
    if w_buffers and w_buffers < stages and 2 * stages + 1 + w_buffers > NAMED_BARRIERS - 1:
        raise MatchError(f"stages={stages}, w_buffers={w_buffers}: {2 * stages + 1 + w_buffers} "
                         f"named barriers, the hardware has {NAMED_BARRIERS - 1} besides "
                         "__syncthreads'")
    unknown = sorted(set(ablate) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"ablate: unknown {', '.join(unknown)} (known: {', '.join(ABLATIONS)})")
    sch, func, g, TM, TN, ks = wg.plan_kernel(func, target, profile, tile, gated_ok=True)
    check_group(g)
    if consumer_units is None:
        consumer_units = CONSUMER_UNITS if producer_units(TM, TN, CONSUMER_UNITS) else 0
    wn = w_buffers if w_buffers and w_buffers < stages else None
    splits = ([(None, None, ks)] if tile is not None and len(tile) > 2 else
              [(length, cond, 1 if g["gated"] else wg.choose_split(
                  length, g["n"], g["k"], (TM, TN), profile.compute_units))
               for length, cond in mma_gemm.lengths_for(g["m"], lengths)])
    variants, helpers = [], dict(HELPERS)
    shared = shared_bytes(g, TM, TN, stages, wn, x_rows)
    for length, cond, k_split in splits:
        grid = -(-(length or 0) // TM) * (g["n"] // TN) * k_split
        if fill_sms and length and grid < mma_gemm.MIN_WAVE * profile.compute_units:
            t = mma_gemm.choose_tile(g["n"], profile.compute_units, m=length,
                                     k=None if g["gated"] else g["k"],
                                     clusters=mma_gemm.cluster_target(target))
            variants.append(mma_variant(func, g, t, cond, target, helpers))
            continue
        pairs, staged = store_modes(g, k_split, pair_stores, staged_stores)
        in_cluster = cluster_sum and k_split > 1
        if in_cluster:
            shared = max(shared, cluster_bytes(TM, TN))
            helpers.update(cuda_cluster.helpers_for((1, 1, k_split)))
        variants.append((cond, kernel_source(func, g, (TM, TN, k_split), stages, ablate, wn,
                                             pairs, x_rows, staged, in_cluster, consumer_units),
                         plan_label(TM, TN, k_split, stages, wn, pairs, x_rows, staged,
                                    in_cluster, consumer_units)))
    if all(" warp-specialised" not in label for _, _, label in variants):
        raise MatchError("no planned prompt length fills the SMs with this kernel")
    src, label = mma_gemm.by_length(variants)
    return wg.finish_kernel(src, helpers, sch, func, g, shared, label)


def deep_or_wide(func, target, profile) -> str | None:
    """``"deep"`` (``K >= DEEP_K_RATIO x N``, ``N >= DEEP_MIN_N``: a down projection) or
    ``"wide"`` (``N >= WIDE_N_RATIO x K``: gate/up) for a prefill GEMM on sm_90a, else None."""
    if not wg.wgmma_supported(target):
        return None
    g = mma_gemm.match_gemm(s_tir.Schedule(func), profile, gated_ok=True)  # (N and K only)
    if g["k"] >= DEEP_K_RATIO * g["n"] and g["n"] >= DEEP_MIN_N:
        return "deep"
    return "wide" if g["n"] >= WIDE_N_RATIO * g["k"] else None


def mid_tile(g: dict, length: int, compute_units: int) -> tuple | None:
    """``(TM, TN, stages)`` of the cluster-summed plan (see :data:`MID_CLUSTER_SUM`) for GEMM
    ``g`` at a prompt of ``length`` tokens, or None where no tile's grid, split in two, fills
    the SMs in one wave (one workgroup a SM at :data:`MID_STAGES`; with :data:`MID_TWO_A_SM`,
    then two a SM at :data:`MID_TWO_A_SM_STAGES` where their shared memory fits)."""
    def tiles():
        for tm in MID_TMS:
            for tn in MID_TNS:
                if not g["n"] % tn:
                    yield tm, tn, -(-length // tm) * (g["n"] // tn) * MID_SPLIT

    for tm, tn, grid in tiles():
        if (wg.choose_split(length, g["n"], g["k"], (tm, tn), compute_units) == MID_SPLIT
                and mma_gemm.MIN_WAVE * compute_units <= grid <= compute_units):
            return tm, tn, MID_STAGES
    if MID_TWO_A_SM:
        S = MID_TWO_A_SM_STAGES
        for tm, tn, grid in tiles():
            each = max(shared_bytes(g, tm, tn, S), cluster_bytes(tm, tn)) + 1024
            if compute_units < grid <= 2 * compute_units and 2 * each <= SM_SHARED:
                return tm, tn, S
    return None


def mid_gemm_kernel(func, target, profile, lengths=None):
    """A mid GEMM (neither deep nor wide) on sm_90a planned by prompt length
    (:func:`.gpu_gemm_mma.lengths_for`): this kernel with K split in two and summed in clusters
    of two where :func:`mid_tile` gives a tile, the mma.sync kernel's plan elsewhere, one
    branch each. :class:`MatchError` where no planned length takes the cluster-summed kernel
    (or :data:`MID_CLUSTER_SUM` is off, or another target, shape or format)."""
    if not MID_CLUSTER_SUM:
        raise MatchError("MID_CLUSTER_SUM is off")
    if not wg.wgmma_supported(target):
        raise MatchError("wgmma needs a CUDA sm_90a target")
    if deep_or_wide(func, target, profile) is not None:
        raise MatchError("a deep or wide GEMM: deep_gemm_kernel")
    sch = s_tir.Schedule(func)
    func = sch.mod["main"]
    g = mma_gemm.match_gemm(sch, profile)
    if g["n"] < g["k"]:  # k or v alone (unmerged): not measured with it
        raise MatchError(f"N={g['n']} < K={g['k']}: the cluster-summed plan takes N >= K")
    if g["fmt"] not in ("e0m4", "int4"):
        raise MatchError("the wgmma kernels take 4-bit weights")
    check_group(g)
    variants, helpers, shared = [], {**mma_gemm.HELPERS, **HELPERS}, 0
    for length, cond in mma_gemm.lengths_for(g["m"], lengths):
        tile = mid_tile(g, length, profile.compute_units)
        if tile is None:
            t = mma_gemm.choose_tile(g["n"], profile.compute_units, m=length, k=g["k"],
                                     clusters=mma_gemm.cluster_target(target))
            variants.append(mma_variant(func, g, t, cond, target, helpers))
            continue
        TM, TN, stages = tile
        helpers.update(cuda_cluster.helpers_for((1, 1, MID_SPLIT)))
        shared = max(shared, shared_bytes(g, TM, TN, stages), cluster_bytes(TM, TN))
        variants.append((cond, kernel_source(func, g, (TM, TN, MID_SPLIT), stages,
                                             cluster_sum=True),
                         plan_label(TM, TN, MID_SPLIT, stages, cluster=True)))
    if not shared:
        raise MatchError("no planned prompt length takes the cluster-summed kernel")
    src, label = mma_gemm.by_length(variants)
    return wg.finish_kernel(src, helpers, sch, func, g, shared, label)


def deep_gemm_kernel(func, target, profile, lengths=None):
    """:func:`ws_gemm_kernel` for a deep GEMM (``K >= DEEP_K_RATIO x N``, ``N >= DEEP_MIN_N``,
    at ``DEEP_*``) or a wide one (``N >= WIDE_N_RATIO x K``, at ``WIDE_*``) on sm_90a, or
    :class:`MatchError` (another target, another shape, or what :func:`ws_gemm_kernel` does not
    take). ``lengths``: see :func:`ws_gemm_kernel`."""
    if not wg.wgmma_supported(target):
        raise MatchError("wgmma needs a CUDA sm_90a target")
    kind = deep_or_wide(func, target, profile)
    if kind == "deep":
        return ws_gemm_kernel(func, target, profile, DEEP_TILE, DEEP_STAGES, (),
                              DEEP_W_BUFFERS, DEEP_PAIR_STORES, DEEP_X_ROWS, lengths=lengths,
                              fill_sms=DEEP_WIDE_FILL_SMS)
    if kind == "wide":
        return ws_gemm_kernel(func, target, profile, WIDE_TILE, WIDE_STAGES, (),
                              WIDE_W_BUFFERS, WIDE_PAIR_STORES, WIDE_X_ROWS,
                              WIDE_STAGED_STORES, lengths=lengths, fill_sms=DEEP_WIDE_FILL_SMS)
    raise MatchError("neither deep nor wide: mma.sync is faster")


__all__ = ["ws_gemm_kernel", "deep_gemm_kernel", "mid_gemm_kernel", "deep_or_wide",
           "kernel_source", "HELPERS", "STAGES", "DEEP_K_RATIO", "ABLATIONS"]
