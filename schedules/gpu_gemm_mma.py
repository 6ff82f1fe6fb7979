"""Prefill GEMM on CUDA tensor cores: ``Y = epilogue(X[.., M, K] @ W[K, N])``, fp16 or 4-bit ``W``.

:class:`.gpu_gemm.GPUPrefillGEMM` tries this kernel first on CUDA (sm_80+, fp16 activations);
anything it does not take (below) goes on to DLight's WMMA rule, then the SIMT schedule.

Kernel
------
A workgroup computes a ``TM x TN`` tile of ``Y`` with ``WM x WN`` warps, each warp a
``TM/WM x TN/WN`` sub-tile of ``mma.sync.m16n8k16`` fragments (fp16 in, fp32 accumulators in
registers; :mod:`.cuda_mma`). Per ``TK = 64`` slice of ``K``::

    global -> registers   X[TM, TK] (16-byte loads, rows past M zero) and the weight slice:
                          fp16 W[TK, TN] (16-byte loads), or the packed codes (8 columns x 4 rows
                          per 16-byte load) with their scale and zero (16-byte loads)
    registers -> shared   X as loaded; the 4-bit weight *dequantized on the way*: per 2 columns
                          one LOP3 (``(w >> 4i) & 0x000F000F | 0x64006400`` = half2(1024 + q)),
                          one HSUB2 (``- c``) and one HMUL2 (``* s``) -- the TIR dequant's exact
                          fp16 arithmetic (:func:`tvm_lite.quant.kernels.dequant_expr`)
    shared -> registers   A fragments with ``ldmatrix.x4``, B (``W[k][n]``) with ``ldmatrix.x4.trans``
    mma                   (TM/WM/16) x (TN/WN/8) ``m16n8k16`` per 16 of K per warp

Two shared buffers alternate: the loads of slice ``k + 1`` are issued before the MMAs of slice
``k`` and stored (dequantized) after them, so global latency hides behind the tensor cores with
one barrier per slice. Shared rows are padded by 16 bytes (conflict-free ``ldmatrix``). The fp32
accumulators go to ``Y`` through the fused epilogue (residual add, SiLU * up, ...: rebuilt on the
value by :func:`.gpu_gemv_half2.attach_epilogue`), rows ``< M`` only.

Tile shape per matrix (:func:`choose_tile`): the largest of ``TILES`` that still gives at least
``MIN_WAVE`` of the device's SMs a workgroup at ``M = PLAN_M`` (the prefill length it is planned
for; ``M`` stays dynamic).

What it takes: one reduction ``x @ W`` with ``W[K, N]`` an fp16 parameter or tvm_lite's
``dequantize`` block (E0M4 or int4), fp16 ``x`` a parameter with at most one non-unit leading
dim, ``N % 64 == 0``, ``K % 32 == 0``, a quantization group that is a multiple of 4 rows dividing
``K``, an elementwise epilogue (or none); no producer blocks before the matmul.
"""

from __future__ import annotations

import re
import textwrap

from tvm import s_tir
from tvm.script import from_source
from tvm.script import tirx as T

from ..convention import GATE_BLOCK
from . import cuda_cluster
from . import cuda_mma as mma
from .gpu_gemv import CODES_PER_WORD, MatchError, _int, match_matmul
from .gpu_gemv_half2 import (E0M4_ZERO_NONE, GATED, attach_epilogue, dequant_roles,
                             gated_epilogue, output_role,
                              param_index)

TK = 64  # K per shared slice (four 16-deep MMA steps; 32 was slower on every measured tile)
PAD = 8  # fp16 elements of padding per shared row (16 bytes)
VEC = 8  # fp16 per 16-byte load
# (TM, TN, warps along M, warps along N), largest first
TILES = ((128, 128, 2, 4), (128, 64, 4, 2), (64, 128, 2, 4), (64, 64, 2, 2))
# Wide matrices (a grid of WIDE_MIN_WAVES or more workgroups a SM at PLAN_M, K unsplit): the
# 128x128 tile with 2 x 2 warps of 64 x 64 instead of 2 x 4 of 64 x 32 (more MMAs per fragment
# loaded). H200, E0M4, M = 512 (``results/issue16_prefill_gemm_async_s13.json``): Llama-1B's
# gate/up (K 2048, N 8192) 69.3 -> 66.6 us, Gemma-2B's (N 16384) 133.6 -> 126.5 us; on the
# narrow ones it lost (Gemma-2B's q, N 2048: 30.9 -> 36.5 us).
WIDE_TILE = (128, 128, 2, 2)
WIDE_MIN_WAVES = 1.9
PLAN_M = 512  # the prompt length the tile is chosen for
# Prompt lengths the prefill GEMMs are planned for where M is symbolic (a prompt's bucket): a
# kernel for each, the host picking one by M (up to the midpoint between neighbouring lengths;
# the longest takes the rest). A plan made for PLAN_M fits the prompts near it only: at M =
# 256 (a 256-token chunk, any prompt of 129-256 tokens) the default gate/up, down and q GEMMs
# of Llama-1B run 64 workgroups on the H200's 132 SMs, and at M = 2048 the down projection
# still writes 4 fp32 partials of every output (64 MB) where 128 workgroups need no split.
# () keeps one plan, PLAN_M's; a static M is planned for PLAN_M. Measured on an H100, Llama-1B's
# whole model, a 2048-token prompt (``python -m tvm_lite.profile --shapes llama-3.2-1b
# --prompt-len 2048 --chunk 256``, against a build with ``()``;
# ``results/issue16_chunked_prefill_by_length_h100_s22.json``): one call 19.35 -> 17.31 ms
# (down 244 -> 206 us a call: no split-K), in chunks of 256 33.60 -> 30.81 ms (down 60 -> 40 us
# a call). At M = 512 the plan is PLAN_M's, as before. ``bench.prefill --parts gemm`` compares
# the single plan: variant "e0m4 (sm_90a one plan)".
PLAN_LENGTHS: tuple = (256, 512, 2048)
MIN_WAVE = 0.9  # a tile is taken if it gives at least this share of the SMs a workgroup
# A short prompt over a shallow K: the largest tile whose grid gives every SM a workgroup with K
# unsplit, where one does, before a larger tile that needs K split (and the partial sums' second
# kernel). Measured on an H100 at M = 256 (``results/issue16_chunks_gemm256_attention_h100_
# s23.json``). Alone (``bench.prefill --parts gemm --gemm-lengths 256 --gemm-tiles ...``), a
# 2048 x 2048 GEMM: 64x64 unsplit 19.1 us; 64x64 split in two 20.5; 64x128 and 128x64 split in
# two 21.3; 128x128 split in four (the rule's tile before) 22.2. In the whole model (Llama-1B, a
# 2048-token prompt in chunks of 256, ``tvm_lite.profile``), 64x64 unsplit took q/k/v (N 3072,
# 192 workgroups) from 29.7 us a call (its sum kernel's included) to 27.8, but the o-projection
# (N 2048, 128 workgroups on 132 SMs, a residual epilogue) from 21.2 to 24.4: so only a grid of
# UNSPLIT_MIN_WAVES. Over K = 8192 the split won (64x64: 63.8 us unsplit, 52.8 split in two).
UNSPLIT_MAX_M = 256
UNSPLIT_MAX_K = 2048
UNSPLIT_MIN_WAVES = 1.0
# ... and where the target sums a split K in a cluster (CLUSTER_SUM, sm_90+: no second kernel,
# the reason for the rule above), a short prompt's unsplit tile over a shallow K (the rule
# above's, or the first that filled the SMs unsplit) takes its K in UNSPLIT_CLUSTER_WAYS, summed
# in a cluster, where K's slices divide so (SPLIT_K_MIN_SLICES or more each); a K too shallow to
# split (SmolLM2's 576: 9 slices) takes NARROW_TILE's 32-row tiles unsplit instead -- either
# way twice the workgroups, each half as long (:func:`split_for_clusters`; 1 turns it off).
# On an H100 (thirty-first session, ``bench.prefill --parts gemm --gemm-lengths 256
# --gemm-tiles ...``, ``results/issue16_gemm_256_tiles_h100_s31.json``): Gemma-2B's merged
# q+k+v (K 2048, N 2560; 160 workgroups of 64 x 64) 26.9 -> 20.8 us with K in two (torch 16.7;
# 128x128 in four 27.2, 128x64 in two 25.4, 32x64 in four 27.8); SmolLM2's gate+up (K 576,
# N 3072) 11.6 -> 10.1 us at 32 x 64 (64x128 12.3, 128x64 13.4, the warp-specialised wgmma
# 12.7-18.1). Of the three models' GEMM plans on sm_90a (every planned length) it changes
# these two only. Timed kernel by kernel, not yet in the whole step.
UNSPLIT_CLUSTER_WAYS = 2
SPLIT_K_WAVE = 1  # split K while the grid gives fewer workgroups than this many a SM
SPLIT_K_MIN_SLICES = 8  # ... and each split keeps at least this many TK slices (512 of K)
# A short prompt (NARROW_MAX_M) over a narrow N where no tile of TILES gives MIN_WAVE of the SMs
# a workgroup, even with K split (SmolLM2's o and down, N 576, at 256 tokens: 36 and 72
# workgroups of 64 x 64): NARROW_TILE's 32-row tiles, K split by the smallest divisor of its
# slices that gives NARROW_WAVES workgroups a SM (any divisor: SmolLM2's K of 576 is 9 slices).
# On an H100 (twenty-ninth session, ``bench.prefill --parts gemm --gemm-models smollm2-135m
# --gemm-lengths 256 --gemm-tiles 32x64x1x2x3``, ``results/issue16_gemm_smollm2_256_h100_s29
# .json``): o 7.9 -> 7.3 us, down 12.1 -> 9.4 (split in three, 216 workgroups), q+k+v 8.0 -> 8.3
# (360); max error against torch 3-4e-4, as the default's. The whole step (``tvm_lite.profile
# --shapes smollm2-135m --prompt-len 2048 --chunk 256 --switch
# narrow:schedules.gpu_gemm_mma.NARROW=True``, ``results/issue16_profile_smollm2_h100_s29.json``):
# the 8 chunks' GPU time 15.41 -> 13.67 ms (q+k+v 2.05 -> 1.59 ms with its sum kernel, o 1.99 ->
# 1.37, down 2.82 -> 2.17), their wall 16.66 -> 15.93 ms: the sum kernels' 472 more launches
# take 1 ms of the gain back.
NARROW = True
NARROW_TILE = (32, 64, 1, 2)
# (0.9 -- q+k+v unsplit, down in two -- lost in the whole step: SmolLM2's chunks 14.87 ->
# 15.79 ms, thirtieth session, ``results/issue16_profile_smollm2_cluster_h100_s30.json``)
NARROW_WAVES = 1.5
NARROW_MAX_M = 256  # the prompt lengths it was timed at (256) and below
# A split K's partials added up in a thread-block cluster (sm_90+) instead of by the second
# kernel: the KS workgroups of an output tile (blockIdx.z) run as one cluster, each leaves its
# fp32 partial tile in its own shared memory (rows CLUSTER_PAD bytes longer), and each then adds
# up every KS-th 16-byte vector of the tile across the cluster (distributed shared memory) and
# stores it through the epilogue: no fp32 partials in global memory, no second launch. The
# narrow tiles' sum kernels (NARROW) cost SmolLM2's chunks 472 launches and 1 ms of host gap in
# their CUDA graphs (twenty-ninth session). On an H100 (thirtieth session, ``bench.prefill
# --parts gemm --gemm-models smollm2-135m --gemm-lengths 256 --gemm-switch
# cl:schedules.gpu_gemm_mma.CLUSTER_SUM=True``, ``results/issue16_gemm_smollm2_cluster_h100_s30
# .json``): o 7.7 -> 6.2 us, down 9.5 -> 8.2, q+k+v 8.3 -> 7.1; the whole step (``tvm_lite.profile
# --shapes smollm2-135m --prompt-len 2048 --chunk 256 --switch cl:...``, ``results/issue16_profile
# _smollm2_cluster_h100_s30.json``): the chunks' kernels 2,915 -> 2,211, their GPU time 2.41x ->
# 2.37x one call's, their wall unchanged as CUDA graphs (14.87 ms both) and 19.52 -> 16.80 ms
# launched kernel by kernel. On; checked on the GPU by
# ``test_mma_cluster_sum_runs_correctly_on_a_hopper_gpu``.
CLUSTER_SUM = True
CLUSTER_MAX = 8  # the portable cluster size: a split of more ways keeps its sum kernel
CLUSTER_PAD = 16  # bytes at the end of a shared row of partials
SUM_THREADS = 256  # threads of a workgroup of the split-K sum
# ... and the neighbouring outputs a thread of it adds up: one 16-byte load of each partial
# (N is a multiple of 64, so a thread's 4 never straddle a row). 1: one output a thread, a
# 4-byte load a partial (the kernel before the twenty-eighth session).
SUM_VEC = 4
# A split K's partials stored as fp16 (summed in fp32 by the second kernel, SUM_VEC a thread:
# one 8-byte load of each; 8 fp16 lanes of an int64 index would be a vector type CUDA C does not
# have) instead of fp32: half the bytes written and read again. Llama-1B's down
# projection (K 8192, N 2048) writes 16.8 MB of fp32 partials at 512 tokens (K in four) and at
# 256 (K in eight), against 8.4 MB of weights; at ~3 TB/s that is ~11 us of a 68 us call, read
# back included. Each partial is rounded to fp16 (a relative error of 2^-11 of its own size, as
# the output's rounding). Off: slower on an H100 (thirtieth session, ``bench.prefill --parts
# gemm --gemm-models llama-3.2-1b,gemma-2b --gemm-layers down --gemm-switch
# p16:schedules.gpu_gemm_mma.PARTIALS_FP16=True``, ``results/issue16_gemm_down_partials_fp16
# _h100_s30.json``): Llama-1B's down 44.0 -> 46.0 us at 256 tokens, 68.2 -> 69.9 at 512;
# Gemma-2B's 69.3 -> 69.7 and 115.1 -> 118.5.
PARTIALS_FP16 = False
EPILOGUE = 'T.call_extern("float32", "__tvm_lite_epilogue__", {})'.format  # the value stored
# a gated store: act(gate) * up from the gate and up accumulators (gpu_gemv_half2.GATED)
EPILOGUE_GATED = ('T.call_extern("float32", "%s", {}, {})' % GATED).format
# X slices by cp.async (16 bytes global -> shared, no registers: the next slice's copies are in
# flight during this slice's MMAs and land at the wait before the slice's barrier), instead of
# loads into registers stored after the MMAs. Frees the X staging registers (16 a thread at
# 128 x 64 slices of 256 threads) and the shared stores. Off until timed on a GPU
# (``bench.prefill --parts gemm``: the "e0m4 (x async)" rows).
X_ASYNC = False
# K slices a thread's loads run ahead of the MMAs, each in its own set of X and W registers
# (with 1, the double buffer above: slice k + 1's loads are issued before slice k's MMAs).
# A narrow tile's MMAs take far less than a load's trip to memory (at 32 x 64 with 2 warps, a
# slice is ~64 tensor-core cycles against ~600-1000 for the load), so one slice in flight makes
# each slice cost a round trip: SmolLM2's 256-token GEMMs (9 slices of K = 576) take 6-11 us,
# the chunks' largest share of their time (thirty-second session). With ``PREFETCH = D``,
# slices k + 1 .. k + D are in flight during slice k's MMAs (D sets of registers; the K loop
# unrolled by D so that each set is named statically; at most KT - 1; X by cp.async keeps 1).
# ``PREFETCH = 0`` takes the depth of the tile (TM, TN, WM, WN) from PREFETCH_BY_TILE (1 where
# it has none); ``PREFETCH = D`` forces D on every tile. Timed on an H100 (fortieth session,
# ``bench.prefill --parts gemm --gemm-models smollm2-135m --gemm-lengths 256,512,2048
# --gemm-switch p2:schedules.gpu_gemm_mma.PREFETCH=2 --gemm-switch p4:...=4``,
# ``results/issue16_gemm_prefetch_h100_s40.json``), us per call, depth 1 / 2 / 4:
#   64 x 64 (512 tokens): o 7.8 / 7.5 / 6.9, q+k+v 8.5 / 7.9 / 7.8, down (K split 2) 12.8 /
#   12.8 / 12.2;
#   128 x 64 (2048 tokens; gate+up at 512): o 18.3 / 17.5 / 20.3, q+k+v 20.3 / 19.6 / 22.1,
#   down 34.9 / 33.8 / 39.4, gate+up 18.6 / 18.1 / 21.4;
#   32 x 64 (256 tokens): o 5.9 / 5.9 / 5.9, q+k+v 6.9 / 6.9 / 6.9, down (K split 3) 8.0 / 8.3
#   / 8.1, gate+up 10.1 / 10.2 / 10.2 -- no depth helps alone, but in SmolLM2's whole step
#   (below) depth 2 takes its chunks' down, q+k+v and o from 2,135 / 1,553 / 1,355 us to 1,935
#   / 1,491 / 1,251 (the gated gate+up 2,173 -> 2,270);
#   128 x 128 (Llama-1B's q+k+v and o at 2048): 106.0 / 163.0 / 250.8 and 66.8 / 88.4 / 150.7
#   -- deeper is much slower (a 64 x 64 warp tile's registers a set).
# SmolLM2's whole step at depth 2 on every tile (``python -m tvm_lite.profile --shapes
# smollm2-135m --prompt-len 2048 --chunk 256 --switch p2:schedules.gpu_gemm_mma.PREFETCH=2``,
# ``results/issue16_prefetch2_smollm2_whole_step_h100_s40.json``; its GEMMs run 128 x 64 in
# the call and 32 x 64 in the chunks, whose entries below give exactly that run's build): one
# 2048-token call 6.422 -> 6.242 ms, chunks of 256 as graphs 13.723 -> 13.515.
PREFETCH = 0
PREFETCH_BY_TILE = {(32, 64, 1, 2): 2, (64, 64, 2, 2): 4, (128, 64, 4, 2): 2}

cuda_cluster.register()  # __cluster_dims__ for the kernels that ask (CLUSTER_SUM)

HELPERS = {
    **mma.HELPERS,
    "tvm_lite_dq_half2": r"""
__forceinline__ __device__ unsigned tvm_lite_dq_half2(unsigned w, unsigned c2, unsigned s2) {
  // h2 = (w & 0x000F000F) | 0x64006400 = half2(1024 + q_lo, 1024 + q_hi): one LOP3
  unsigned h;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(h) : "r"(w), "r"(0x000F000Fu), "r"(0x64006400u));
  __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&h), *reinterpret_cast<__half2*>(&c2)),
                      *reinterpret_cast<__half2*>(&s2));
  return *reinterpret_cast<unsigned*>(&r);
}
""",
    "tvm_lite_st_shared_v4": r"""
__forceinline__ __device__ void tvm_lite_st_shared_v4(void* p, unsigned a, unsigned b,
                                                      unsigned c, unsigned d) {
  *reinterpret_cast<uint4*>(p) = make_uint4(a, b, c, d);
}
""",
}


def split_ways(grid: int, slices: int, compute_units: int) -> int:
    """Ways to split K (a power of two) for a grid of ``grid`` workgroups over ``slices`` K
    slices: doubled while the grid covers less than ``MIN_WAVE`` of ``SPLIT_K_WAVE`` workgroups
    a SM and each split keeps :data:`SPLIT_K_MIN_SLICES` slices."""
    ks = 1
    while (grid * ks < MIN_WAVE * SPLIT_K_WAVE * compute_units and slices % (2 * ks) == 0
           and slices // (2 * ks) >= SPLIT_K_MIN_SLICES):
        ks *= 2
    return ks


def cluster_target(target) -> bool:
    """Whether ``target`` adds a split K's partials up in a cluster (:data:`CLUSTER_SUM`)."""
    return CLUSTER_SUM and cuda_cluster.supported(target)


def sums_in_cluster(tile, target) -> bool:
    """Whether ``tile``'s split K is added up in a cluster (:data:`CLUSTER_SUM`) on ``target``."""
    return 1 < tile[4] <= CLUSTER_MAX and cluster_target(target)


def helpers_for(tiles_in_cluster) -> dict:
    """The helpers the kernels of these plans call: :data:`HELPERS`, and the cluster's (its
    barrier, distributed shared-memory loads, marker) for each K split summed in a cluster."""
    helpers = dict(HELPERS)
    for ks in tiles_in_cluster:
        helpers.update(cuda_cluster.helpers_for((1, 1, ks)))
    return helpers


def choose_tile(n: int, compute_units: int, m: int = PLAN_M, k: int | None = None,
                clusters: bool = False) -> tuple:
    """``(TM, TN, WM, WN, KS)`` for an ``N``-column output: the first tile of ``TILES`` (largest
    first) whose grid at ``M = m``, with ``K`` split ``KS`` ways (partials summed by a second
    kernel), covers ``MIN_WAVE`` of the SMs; ``K`` is split while the grid covers less than ``MIN_WAVE`` of
    ``SPLIT_K_WAVE`` workgroups a SM and each split keeps ``SPLIT_K_MIN_SLICES`` slices. Where no
    tile covers them, the one with the most workgroups. A short prompt over a shallow K
    (:data:`UNSPLIT_MAX_M`, :data:`UNSPLIT_MAX_K`) that would split K takes the largest tile that
    gives every SM a workgroup (:data:`UNSPLIT_MIN_WAVES`) with K unsplit instead, if one does.
    With ``clusters`` (the target sums a split K in a cluster: :func:`cluster_target`) such a
    prompt's unsplit tile, wherever it came from, goes to :func:`split_for_clusters`.

    A wide grid (:data:`WIDE_MIN_WAVES`) takes :data:`WIDE_TILE`'s 64 x 64 warp tiles.

    Measured on an H200 (E0M4, M = 512, ``bench.prefill --gemm-tiles``): a 128x128 tile with K
    split in two beat smaller tiles unsplit or split, e.g. Llama-1B's down projection
    (K 8192, N 2048) 220 TFLOP/s vs 122 for 128x64 split in two with 32-deep slices."""
    fits = [t for t in TILES if n % t[1] == 0]
    if not fits:
        raise MatchError(f"N={n} is not a multiple of {min(t[1] for t in TILES)}")
    slices = (k or 0) // TK

    def split(t):
        grid = -(-m // t[0]) * (n // t[1])
        ks = split_ways(grid, slices, compute_units)
        return grid * ks, (*t, ks)

    found = [split(t) for t in fits]
    wave, tile = next(((wave, tile) for wave, tile in found if wave >= MIN_WAVE * compute_units),
                      max(found, key=lambda f: f[0]))
    short_shallow = bool(k) and m <= UNSPLIT_MAX_M and k <= UNSPLIT_MAX_K
    if tile[4] > 1 and short_shallow:  # unsplit, if one fills
        wave, tile = next(((w, t) for w, t in found
                           if t[4] == 1 and w >= UNSPLIT_MIN_WAVES * compute_units), (wave, tile))
    if clusters and short_shallow and tile[4] == 1 and wave >= MIN_WAVE * compute_units:
        return split_for_clusters(tile, n, m, slices)
    if tile[:2] == WIDE_TILE[:2] and tile[4] == 1 and wave >= WIDE_MIN_WAVES * compute_units:
        return (*WIDE_TILE, 1)
    if (NARROW and m <= NARROW_MAX_M and wave < MIN_WAVE * compute_units
            and n % NARROW_TILE[1] == 0):
        return narrow_tile(n, compute_units, m, slices)
    return tile


def split_for_clusters(tile: tuple, n: int, m: int, slices: int) -> tuple:
    """The unsplit short-prompt ``tile`` on a target that sums a split K in a cluster: its K
    split :data:`UNSPLIT_CLUSTER_WAYS` ways where the slices divide into
    :data:`SPLIT_K_MIN_SLICES` or more each, else :data:`NARROW_TILE` unsplit where it applies
    (``m`` up to :data:`NARROW_MAX_M`, ``n`` a multiple of its width), else ``tile``."""
    ways = UNSPLIT_CLUSTER_WAYS
    if ways > 1 and slices % ways == 0 and slices // ways >= SPLIT_K_MIN_SLICES:
        return (*tile[:4], ways)
    if ways > 1 and NARROW and m <= NARROW_MAX_M and n % NARROW_TILE[1] == 0:
        return (*NARROW_TILE, 1)
    return tile


def narrow_tile(n: int, compute_units: int, m: int, slices: int) -> tuple:
    """:data:`NARROW_TILE` with K split by the smallest divisor of ``slices`` whose grid gives
    :data:`NARROW_WAVES` workgroups a SM (the largest divisor if none does)."""
    grid = -(-m // NARROW_TILE[0]) * (n // NARROW_TILE[1])
    divisors = [d for d in range(1, max(slices, 1) + 1) if slices % d == 0] or [1]
    ks = next((d for d in divisors if grid * d >= NARROW_WAVES * compute_units), divisors[-1])
    return (*NARROW_TILE, ks)


def lengths_for(m: str, lengths=None) -> list[tuple[int, str | None]]:
    """``[(length planned for, the host's condition on M)]`` for a GEMM whose M is ``m`` (text:
    a number or a variable's name): ``[(PLAN_M, None)]`` where ``m`` is a number or ``lengths``
    (default :data:`PLAN_LENGTHS`) is empty; else one pair a length, shortest first, each up to
    the midpoint to the next, the last unconditioned."""
    lengths = PLAN_LENGTHS if lengths is None else lengths
    if not lengths or m.isdigit():
        return [(PLAN_M, None)]
    ls = sorted(set(lengths))
    return [(a, f"{m} <= T.int64({(a + b) // 2})") for a, b in zip(ls, ls[1:])] + [(ls[-1], None)]


_WORKSPACE = re.compile(  # output_store's split-K partials (fp32 or fp16): KS * M * N
    r'    ws = T\.alloc_buffer\(\((\d+) \* (.+?),\), "float(?:32|16)", scope="global"\)\n')
_NEST = "    for bx in T.thread_binding("
_NAME = re.compile(r"def \w+\(")


def by_length(variants: list[tuple[str | None, str, str]]) -> tuple[str, str]:
    """``(source, label)`` of one kernel from ``variants``, ``(host condition or None, source,
    label)`` of the same function planned for different prompt lengths (:func:`lengths_for`).
    The source: the head and buffer declarations once, each variant's kernels (from its first
    thread binding on) under its condition, tested in turn (the last: unconditioned), each with
    its own fp32 split-K workspace (allocated in its branch: a long prompt's plan that does not
    split allocates nothing for a short one's that does). The label (``tvm_lite.gemm``): the
    last variant's, then ``; if <condition>: <label>`` for each other branch. Consecutive
    variants with the same kernels are one branch."""
    parts = []
    for cond, src, label in variants:
        at = src.index(_NEST)
        nest = src[at:]
        if parts and parts[-1][2] == nest:
            parts[-1] = (cond, parts[-1][1], nest, label)  # the same plan: one branch for both
        else:
            parts.append((cond, src[:at], nest, label))
    text = parts[-1][3]
    for cond, _, _, label in parts[:-1]:
        text += f"; if {cond.replace('T.int64(', '').replace(')', '')}: {label}"
    if len(parts) == 1:
        return variants[-1][1], text
    # (kernels of different families -- mma.sync, wgmma -- differ in the PrimFunc's name only)
    heads = [_NAME.sub("def gemm(", _WORKSPACE.sub("", head)) for _, head, _, _ in parts]
    if len(set(heads)) != 1:
        raise ValueError("by_length: the variants' heads differ beyond their workspaces")
    src = heads[0]
    depth = 0
    for cond, head, nest, _ in parts:  # each branch allocates its own partials (if it splits K)
        space = _WORKSPACE.search(head)
        nest = textwrap.dedent((space.group(0) if space else "") + nest)  # (at 4 before)
        pad = " " * 4 * depth
        if cond is not None:
            src += f"{pad}    if {cond}:\n{indent(nest, 4 * depth + 8)}\n{pad}    else:\n"
            depth += 1
        else:
            src += indent(nest, 4 * depth + 4) + "\n"
    return src, text


def _decl(func) -> tuple[list, str, str]:
    """(parameter names, ``T.handle`` parameter list, the buffer declarations): static dims as
    ``T.int64(..)``, symbolic ones by their names (declared once)."""
    names = [f"p{i}" for i in range(len(func.params))]
    sym, lines = [], []
    for nm, prm in zip(names, func.params):
        dims = []
        for d in prm.shape:
            if _int(d) is not None:
                dims.append(f"T.{d.ty.dtype}({int(d)})")
            else:
                if not hasattr(d, "name"):
                    raise MatchError(f"shape dim {d} is neither static nor a variable")
                if d.name not in sym:
                    sym.append(d.name)
                    lines.append(f"    {d.name} = T.{d.ty.dtype}()")
                dims.append(d.name)
        lines.append(f'    {nm} = T.match_buffer(var_{nm}, ({", ".join(dims)},), "{prm.dtype}")')
    params = ", ".join(f"var_{nm}: T.handle" for nm in names)
    return names, params, "\n".join(lines)


def _row_at(buf, row: str, col: str) -> str:
    """Index text of ``buf[.., row, col]``: the non-unit leading dim (if any) gets ``row``."""
    lead = buf.shape[:-1]
    idx = []
    for d in lead:
        idx.append("0" if _int(d) == 1 else row)
    return ", ".join(idx + [col])


def packed_views(names: list, g: dict) -> str:
    """Declarations of the packed weight's uint32 views (``codes32 [K/4, N/2]``, ``scale32``
    and, for E0M4, ``zero32 [K/G, N/2]``): a 16-byte load takes 8 columns' codes of one packed
    row (4 rows of ``W``), or their 8 scales or zeros."""
    K, N, G = g["k"], g["n"], g["group"]
    views = (f'    codes32 = T.decl_buffer(({K // CODES_PER_WORD}, {N // 2}), "uint32", '
             f'data={names[g["roles"]["w"]]}.data)\n'
             f'    scale32 = T.decl_buffer(({K // G}, {N // 2}), "uint32", '
             f'data={names[g["roles"]["scale"]]}.data)\n')
    if g["fmt"] == "e0m4":
        views += (f'    zero32 = T.decl_buffer(({K // G}, {N // 2}), "uint32", '
                  f'data={names[g["roles"]["zero"]]}.data)\n')
    return views


def packed_load(g: dict, row: str, grp: str, col2: str, pad: str) -> tuple[str, str]:
    """(the statements loading 8 columns' codes of packed row ``row``, their scales and zeros of
    group ``grp`` into ``wv``, ``sv``, ``zv`` at ``l * 4``, each line after the first indented by
    ``pad``; the zero word of pair ``p`` as the dequant takes it: int4's is the constant
    1024 + 8)."""
    P = VEC // 2
    load = (f"wv[T.Ramp(l * {P}, 1, {P})] = codes32[{row}, T.Ramp({col2}, 1, {P})]\n"
            f"{pad}sv[T.Ramp(l * {P}, 1, {P})] = scale32[{grp}, T.Ramp({col2}, 1, {P})]")
    if g["fmt"] != "e0m4":
        return load, f"T.uint32({E0M4_ZERO_NONE})"
    return (load + f"\n{pad}zv[T.Ramp(l * {P}, 1, {P})] = zero32[{grp}, T.Ramp({col2}, 1, {P})]",
            f"zv[l * {P} + p]")


def slice_at(text: str, kn: str, sb: str, KS: int, KT: int) -> str:
    """A load template (``{kn}``: the K slice, of this workgroup's split ``bz`` when ``KS > 1``
    and ``kn`` is given) or store template (``{sb}``: the stage) filled in."""
    if KS > 1 and kn:
        kn = f"(bz * {KT} + {kn})"
    return text.replace("{kn}", kn).replace("{sb}", sb)


def indent(text: str, n: int) -> str:
    return "\n".join(" " * n + ln for ln in text.splitlines())


def kernel_head(name: str, params: str, decls: str, views: str, workspace: str, grid) -> str:
    """TVMScript of a GEMM kernel's head: the PrimFunc ``name``, its buffers and views, and the
    workgroup ``(bx, bz, by)`` and thread ``tx`` bindings of ``grid = (N / TN, KS, ceil(M /
    TM) as text, threads)``; the body follows at 16 spaces."""
    nx, ks, ny, threads = grid
    return f'''
@T.prim_func(private=True)
def {name}({params}):
    T.func_attr({{"tirx.noalias": True}})
{decls}
{views}{workspace}    for bx in T.thread_binding({nx}, thread="blockIdx.x"):
      for bz in T.thread_binding({ks}, thread="blockIdx.z"):
        for by in T.thread_binding({ny}, thread="blockIdx.y"):
            for tx in T.thread_binding({threads}, thread="threadIdx.x"):'''


def output_store(out: str, obuf, M, N: int, KS: int, row: str, col: str, value: str) -> tuple:
    """(workspace declaration, the store of accumulator ``value`` at ``(row, col)``, the second
    kernel): through the epilogue into ``out``, or with K split, fp32 partials ``[KS, M, N]``
    that :func:`split_sum` adds up (and applies the epilogue to)."""
    if KS == 1:
        return "", f"{out}[{_row_at(obuf, row, col)}] = {EPILOGUE(value)}", ""
    dtype = "float16" if PARTIALS_FP16 else "float32"
    part = f'T.Cast("float16", {value})' if PARTIALS_FP16 else value
    return (f'    ws = T.alloc_buffer(({KS} * {M} * {N},), "{dtype}", scope="global")\n',
            f"ws[(bz * {M} + {row}) * {N} + {col}] = {part}", split_sum(out, obuf, M, N, KS))


def split_sum(out: str, obuf, M, N: int, KS: int) -> str:
    """The second kernel of a K-split GEMM: each output element the sum of the ``KS`` partials
    in ``ws`` (fp32, or fp16 with :data:`PARTIALS_FP16`), in fp32, through the epilogue;
    :data:`SUM_VEC` neighbouring outputs a thread (one 16-byte load of each fp32 partial, or
    an 8-byte one of each fp16 one)."""
    T_, V = SUM_THREADS, SUM_VEC
    e = f"((b * {T_} + t) * {V})"
    if PARTIALS_FP16:  # a vector load of the fp16 partials into registers, added up one by one
        first = f'''hv[T.Ramp(0, 1, {V})] = ws[T.Ramp({e}, 1, {V})]
                for i in T.unroll({V}):
                    tot[i] = T.Cast("float32", hv[i])'''
        more = f'''hv[T.Ramp(0, 1, {V})] = ws[T.Ramp(s * {M} * {N} + {e}, 1, {V})]
                    for i in T.unroll({V}):
                        tot[i] = tot[i] + T.Cast("float32", hv[i])'''
    else:
        vec = lambda at: f"ws[T.Ramp({at}, 1, {V})]" if V > 1 else f"ws[{at}]"  # noqa: E731
        acc = f"tot[T.Ramp(0, 1, {V})]" if V > 1 else "tot[0]"
        first, more = f"{acc} = {vec(e)}", f"{acc} = {acc} + {vec(f's * {M} * {N} + {e}')}"
    hv = f'            hv = T.alloc_buffer(({V},), "float16", scope="local")\n' if PARTIALS_FP16 else ""
    return f'''    for b in T.thread_binding(({M} * {N} + {T_ * V - 1}) // {T_ * V}, thread="blockIdx.x"):
        for t in T.thread_binding({T_}, thread="threadIdx.x"):
            tot = T.alloc_buffer(({V},), "float32", scope="local")
{hv}            if {e} < {M} * {N}:
                {first}
                for s in T.unroll(1, {KS}):
                    {more}
                for i in T.unroll({V}):
                    {out}[{_row_at(obuf, f"({e} + i) // {N}", f"({e} + i) % {N}")}] = {EPILOGUE("tot[i]")}
'''


def match_gemm(sch, profile, gated_ok: bool = False):
    """The roles of a prefill matmul this kernel takes (raises :class:`MatchError` otherwise):
    ``dict(fmt, k, n, group, m (text), roles, out_dtype, final, matmul_buf, gated)``.
    ``gated``: the epilogue is a gated MLP's activation over the interleaved gate and up columns
    (``relax_passes/fuse_gated_epilogue.py``; the output has ``N / 2`` columns); only a caller
    that stores it (``gated_ok``: :func:`kernel_source` and the warp-specialised kernel's staged
    stores) takes such a function."""
    func = sch.mod["main"]
    main, dequant, producers, epilogues, m, n, k = match_matmul(sch, decode=False)
    if producers:
        raise MatchError("producers before the matmul")
    out_buf = sch.get(main).writes[0].source
    if dequant is not None:
        fmt, codes, scale, zero = dequant_roles(sch, dequant)
        w = sch.get(dequant).writes[0].source
    else:
        fmt, zero = "fp16", None
        ws = [r.source for r in sch.get(main).reads if len(r.source.shape) == 2
              and _int(r.source.shape[0]) == k and _int(r.source.shape[1]) == n]
        if len(ws) != 1 or str(ws[0].dtype) != "float16":
            raise MatchError("the weight is not one fp16 [K, N] buffer")
        w = codes = ws[0]
        scale = None
    xs = [r.source for r in sch.get(main).reads
          if not r.source.same_as(w) and not r.source.same_as(out_buf)]
    if len(xs) != 1 or str(xs[0].dtype) != "float16":
        raise MatchError("needs fp16 activations")
    x = xs[0]
    if _int(x.shape[-1]) != k or sum(_int(d) != 1 for d in x.shape[:-1]) > 1:
        raise MatchError("x is not [.., M, K] with one non-unit leading dim")
    lead_m = [d for d in x.shape[:-1] if _int(d) != 1]
    if not lead_m:
        raise MatchError("M == 1")
    if n % 64 or k % TK:
        raise MatchError(f"N={n} or K={k} does not tile (N % 64, K % {TK})")
    group = k
    if scale is not None:
        ng = _int(scale.shape[0])
        if not ng or k % ng or (k // ng) % CODES_PER_WORD:
            raise MatchError("quantization groups do not tile K")
        group = k // ng
        if _int(codes.shape[0]) * CODES_PER_WORD != k or _int(codes.shape[1]) != n:
            raise MatchError("codes are not [K/4, N]")
    roles = {"x": param_index(func, x), "w": param_index(func, codes)}
    if scale is not None:
        roles["scale"] = param_index(func, scale)
    if zero is not None:
        roles["zero"] = param_index(func, zero)
    roles["out"], final = output_role(func, sch, epilogues, out_buf)
    out = func.params[roles["out"]]
    gated = _int(out.shape[-1]) == n // 2 and gated_epilogue(sch, final, out_buf)
    if gated and not gated_ok:
        raise MatchError("a gated epilogue: this kernel does not store one")
    if gated and n % (2 * GATE_BLOCK):
        raise MatchError(f"a gated epilogue needs N a multiple of {2 * GATE_BLOCK}")
    if len(out.shape) != len(x.shape) or _int(out.shape[-1]) != (n // 2 if gated else n):
        raise MatchError("output is not [.., M, N] like x")
    mtext = str(int(lead_m[0])) if _int(lead_m[0]) is not None else lead_m[0].name
    return dict(fmt=fmt, k=k, n=n, group=group, m=mtext, roles=roles,
                out_dtype=str(out_buf.dtype), final=final, matmul_buf=out_buf, gated=gated)


def prefetch_of(g: dict, tile, x_async: bool | None = None) -> int:
    """The K slices in flight ahead of the MMAs of the kernel at ``tile``: :data:`PREFETCH`,
    or where that is 0 the tile's :data:`PREFETCH_BY_TILE` (default 1); at most its slices
    less one, 1 where X goes by ``cp.async``."""
    x_async = X_ASYNC if x_async is None else x_async
    TK_ = tile[5] if len(tile) > 5 else TK
    slices = g["k"] // TK_ // tile[4]
    depth = int(PREFETCH) or PREFETCH_BY_TILE.get(tuple(tile[:4]), 1)
    return 1 if x_async else max(1, min(depth, slices - 1))


def _in_register_set(text: str, offsets: dict) -> str:
    """``text`` with each ``xv[..l * ``, ``wv[``, ``sv[``, ``zv[`` register index moved to a
    register set: ``offsets`` maps an array to the vector steps before its set (``l`` counts a
    thread's vectors of one slice)."""
    def moved(m):
        off = offsets.get(m.group(1))
        return m.group(0) if not off else f"{m.group(1)}[{m.group(2) or ''}({off} + l) * "
    return re.sub(r"\b(xv|wv|sv|zv)\[(T\.Ramp\()?l \* ", moved, text)


def kernel_source(func, g: dict, tile, x_async: bool | None = None,
                  cluster_sum: bool = False) -> str:
    """TVMScript of the kernel for ``func`` (roles ``g`` from :func:`match_gemm`, ``tile`` from
    :func:`choose_tile`, optionally with a sixth entry: the K slice, ``TK`` if absent); its
    stores write ``__tvm_lite_epilogue__(acc)``. ``x_async``: X by ``cp.async`` (default
    :data:`X_ASYNC`). ``cluster_sum``: a split K's partials added up in a thread-block cluster
    (:data:`CLUSTER_SUM`; the caller checks the target, :func:`sums_in_cluster`).
    The K slices loaded ahead: :data:`PREFETCH` (:func:`prefetch_of`)."""
    D = prefetch_of(g, tile, x_async)
    x_async = X_ASYNC if x_async is None else x_async
    names, params, decls = _decl(func)
    TM, TN, WM, WN, KS = tile[:5]
    TK = tile[5] if len(tile) > 5 else globals()["TK"]  # noqa: N806
    K, N, M, G, fmt = g["k"], g["n"], g["m"], g["group"], g["fmt"]
    x, out = names[g["roles"]["x"]], names[g["roles"]["out"]]
    xbuf, obuf = func.params[g["roles"]["x"]], func.params[g["roles"]["out"]]
    threads = 32 * WM * WN
    WTM, WTN = TM // WM, TN // WN
    MT, NT = WTM // 16, WTN // 8
    XP, WP = TK + PAD, TN + PAD  # shared row lengths
    XO = TM * XP  # offset of the W tile in a stage
    STAGE = TM * XP + TK * WP
    KT = K // TK // KS  # slices of one split
    warp, lane = "(tx // 32)", "(tx % 32)"
    wm, wn = f"({warp} // {WN})", f"({warp} % {WN})"
    g4, t4 = f"({lane} // 4)", f"({lane} % 4)"

    def loads(total: int):
        """(steps, guard, element index) of a cooperative loop over ``total`` vectors."""
        steps = -(-total // threads)
        e = f"(l * {threads} + tx)"
        guard = f"{e} < {total}" if steps * threads != total else "True"
        return steps, guard, e

    # X slice: TM rows x TK/VEC vectors
    xs, xguard, xe = loads(TM * TK // VEC)
    xr, xc = f"({xe} // {TK // VEC})", f"({xe} % {TK // VEC} * {VEC})"
    x_load = f'''for l in T.unroll({xs}):
    if {xguard}:
        if by * {TM} + {xr} < {M}:
            xv[T.Ramp(l * {VEC}, 1, {VEC})] = {x}[{_row_at(xbuf, f"by * {TM} + {xr}", f"T.Ramp({{kn}} * {TK} + {xc}, 1, {VEC})")}]
        else:
            xv[T.Ramp(l * {VEC}, 1, {VEC})] = T.Broadcast(T.float16(0), {VEC})'''
    x_store = f'''for l in T.unroll({xs}):
    if {xguard}:
        sm[T.Ramp({{sb}} + {xr} * {XP} + {xc}, 1, {VEC})] = xv[T.Ramp(l * {VEC}, 1, {VEC})]'''
    if x_async:  # straight into the stage (``{sb}``); rows past M get zeros by a plain store
        copy = mma.call("tvm_lite_cp_async16", f"T.address_of(sm[{{sb}} + {xr} * {XP} + {xc}])",
                        f"T.address_of({x}[{_row_at(xbuf, f'by * {TM} + {xr}', f'{{kn}} * {TK} + {xc}')}])")
        x_load = f'''for l in T.unroll({xs}):
    if {xguard}:
        if by * {TM} + {xr} < {M}:
            T.evaluate({copy})
        else:
            sm[T.Ramp({{sb}} + {xr} * {XP} + {xc}, 1, {VEC})] = T.Broadcast(T.float16(0), {VEC})'''
        x_store = ""
    if fmt == "fp16":
        ws_, wguard, we = loads(TK * TN // VEC)
        wr, wc = f"({we} // {TN // VEC})", f"({we} % {TN // VEC} * {VEC})"
        w = names[g["roles"]["w"]]
        w_regs = f'wv = T.alloc_buffer(({D * ws_ * VEC},), "float16", scope="local")'
        w_load = f'''for l in T.unroll({ws_}):
    if {wguard}:
        wv[T.Ramp(l * {VEC}, 1, {VEC})] = {w}[{{kn}} * {TK} + {wr}, T.Ramp(bx * {TN} + {wc}, 1, {VEC})]'''
        w_store = f'''for l in T.unroll({ws_}):
    if {wguard}:
        sm[T.Ramp({{sb}} + {XO} + {wr} * {WP} + {wc}, 1, {VEC})] = wv[T.Ramp(l * {VEC}, 1, {VEC})]'''
        views = ""
    else:
        # a 16-byte load of codes: 8 columns (4 uint32 pairs) of one packed row = 4 rows of W
        ws_, wguard, we = loads(TK // CODES_PER_WORD * TN // VEC)
        wr, wc = f"({we} // {TN // VEC})", f"({we} % {TN // VEC} * {VEC})"
        col2 = f"((bx * {TN} + {wc}) // 2)"
        grp = f"(({{kn}} * {TK} + {wr} * {CODES_PER_WORD}) // {G})"
        P = VEC // 2
        views = packed_views(names, g)
        load, zero_at = packed_load(g, f"{{kn}} * {TK // CODES_PER_WORD} + {wr}", grp, col2,
                                    " " * 8)
        w_regs = (f'wv = T.alloc_buffer(({D * ws_ * P},), "uint32", scope="local")\n'
                  f'sv = T.alloc_buffer(({D * ws_ * P},), "uint32", scope="local")\n'
                  f'zv = T.alloc_buffer(({D * ws_ * P},), "uint32", scope="local")\n'
                  f'dq = T.alloc_buffer(({P},), "uint32", scope="local")')
        w_load = f'''for l in T.unroll({ws_}):
    if {wguard}:
        {load}'''
        dq = mma.call("tvm_lite_dq_half2", "T.shift_right(wv[l * %d + p], T.uint32(4 * i))" % P,
                      zero_at, f"sv[l * {P} + p]", ret="uint32")
        st = mma.call("tvm_lite_st_shared_v4",
                      f"T.address_of(sm[{{sb}} + {XO} + ({wr} * {CODES_PER_WORD} + i) * {WP} + {wc}])",
                      *[f"dq[{p}]" for p in range(P)])
        w_store = f'''for l in T.unroll({ws_}):
    if {wguard}:
        for i in T.unroll({CODES_PER_WORD}):
            for p in T.unroll({P}):
                dq[p] = {dq}
            T.evaluate({st})'''

    def at(text: str, kn: str, sb: str) -> str:
        return slice_at(text, kn, sb, KS, KT)

    a_addr = f"T.address_of(sm[ko % 2 * {STAGE} + ({wm} * {WTM} + mt * 16 + {lane} % 16) * {XP} + kk * 16 + {lane} // 16 * 8])"
    b_addr = (f"T.address_of(sm[ko % 2 * {STAGE} + {XO} + (kk * 16 + {lane} // 8 % 2 * 8 + {lane} % 8) * {WP} + "
              f"{wn} * {WTN} + np * 16 + {lane} // 16 * 8])")
    AF = [f"af[mt * 4 + {i}]" for i in range(4)]
    row = f"by * {TM} + {wm} * {WTM} + mt * 16 + {g4} + c // 2 * 8"
    col = f"bx * {TN} + {wn} * {WTN} + nt * 8 + {t4} * 2 + c % 2"
    x_regs = "" if x_async else f'xv = T.alloc_buffer(({D * xs * VEC},), "float16", scope="local")'
    # the stage the next slice's X goes to (cp.async writes it at once), and the wait that lands
    # a thread's copies before the barrier that hands them to the workgroup
    x_next = f"(ko + 1) % 2 * {STAGE}" if x_async else ""
    wait = f"T.evaluate({mma.call('tvm_lite_cp_async_wait_all')})" if x_async else ""
    value = f"acc[(mt * {NT} + nt) * 4 + c]"
    cluster_sum = cluster_sum and KS > 1
    workspace, store, sum_kernel = output_store(out, obuf, M, N, 1 if cluster_sum else KS, row,
                                                col, value)
    shared = 2 * STAGE  # fp16 elements
    stores = f'''for mt in T.unroll({MT}):
    for nt in T.unroll({NT}):
        for c in T.unroll(4):
            if {row} < {M}:
                {store}'''
    if g.get("gated"):  # n8 tiles 2p (gate) and 2p + 1 (up) of a warp: GATE_BLOCK is 8
        if KS > 1 or WTN % (2 * GATE_BLOCK) or GATE_BLOCK != 8:
            raise MatchError(f"a gated epilogue: K unsplit (KS {KS}) and warp tiles of "
                             f"{2 * GATE_BLOCK}-column pairs (WTN {WTN})")
        ocol = f"bx * {TN // 2} + {wn} * {WTN // 2} + nt * 8 + {t4} * 2 + c % 2"
        gate, up = (f"acc[(mt * {NT} + nt * 2 + {h}) * 4 + c]" for h in (0, 1))
        stores = f'''for mt in T.unroll({MT}):
    for nt in T.unroll({NT // 2}):
        for c in T.unroll(4):
            if {row} < {M}:
                {out}[{_row_at(obuf, row, ocol)}] = {EPILOGUE_GATED(gate, up)}'''
    mark = ""
    if cluster_sum:
        stores, shared = cluster_stores(out, obuf, g, (TM, TN, KS), threads, stores_at=(
            f"{wm} * {WTM} + mt * 16 + {g4}", f"{wn} * {WTN} + nt * 8 + {t4} * 2", MT, NT))
        shared = max(2 * STAGE, shared)
        mark = f"T.evaluate({mma.call(cuda_cluster.marker((1, 1, KS)))})"
    def mma_step(slice_: str) -> str:
        """Slice ``slice_``'s MMAs, from its stage (unindented)."""
        a, b = (addr.replace("sm[ko % 2 *", f"sm[{slice_} % 2 *") for addr in (a_addr, b_addr))
        return f'''for kk in T.unroll({TK // 16}):
    for mt in T.unroll({MT}):
        af[T.Ramp(mt * 4, 1, 4)] = {mma.call("tvm_lite_ldsm_x4", a, ret="uint32x4")}
    for np in T.unroll({NT // 2}):
        bf[T.Ramp(0, 1, 4)] = {mma.call("tvm_lite_ldsm_x4_trans", b, ret="uint32x4")}
        for mt in T.unroll({MT}):
            T.evaluate({mma.call("tvm_lite_mma16816", f"T.address_of(acc[(mt * {NT} + np * 2) * 4])", *AF, "bf[0]", "bf[1]")})
            T.evaluate({mma.call("tvm_lite_mma16816", f"T.address_of(acc[(mt * {NT} + np * 2 + 1) * 4])", *AF, "bf[2]", "bf[3]")})'''

    if D == 1:  # the double buffer: slice ko + 1 in flight during slice ko's MMAs
        loop = f'''{indent(at(x_load, "0", "0"), 16)}
{indent(at(w_load, "0", "0"), 16)}
{indent(at(x_store, "0", "0"), 16)}
{indent(at(w_store, "0", "0"), 16)}
{indent(wait, 16)}
                T.tvm_storage_sync("shared")
                for ko in T.serial({KT}):
                    if ko + 1 < {KT}:
{indent(at(x_load, "(ko + 1)", x_next), 24)}
{indent(at(w_load, "(ko + 1)", ""), 24)}
{indent(mma_step("ko"), 20)}
                    if ko + 1 < {KT}:
{indent(at(x_store, "", f"(ko + 1) % 2 * {STAGE}"), 24)}
{indent(at(w_store, "", f"(ko + 1) % 2 * {STAGE}"), 24)}
{indent(wait, 20)}
                    T.tvm_storage_sync("shared")'''
    else:
        loop = prefetched_loop(dict(x_load=x_load, w_load=w_load, x_store=x_store,
                                    w_store=w_store), at, D, KT, STAGE, mma_step,
                               {"xv": xs, "wv": ws_, "sv": ws_, "zv": ws_})
    head = kernel_head("gemm_mma", params, decls, views, workspace,
                       (N // TN, KS, f"({M} + {TM - 1}) // {TM}", threads))
    return f'''{head}
                sm = T.alloc_buffer(({shared},), "float16", scope="shared.dyn")
{indent(mark, 16)}
                acc = T.alloc_buffer(({MT * NT * 4},), "float32", scope="local")
                af = T.alloc_buffer(({MT * 4},), "uint32", scope="local")
                bf = T.alloc_buffer((4,), "uint32", scope="local")
{indent(x_regs, 16)}
{indent(w_regs, 16)}
                for i in T.unroll({MT * NT * 4}):
                    acc[i] = T.float32(0)
{loop}
{indent(stores, 16)}
{sum_kernel}'''


def prefetched_loop(t: dict, at, D: int, KT: int, STAGE: int, mma_step, steps: dict) -> str:
    """The K loop (indented for :func:`kernel_source`) with slices ``k + 1 .. k + D`` in flight
    during slice ``k``'s MMAs (:data:`PREFETCH`): slice ``s`` is loaded into register set
    ``s % D``, ``D`` slices ahead, and stored to stage ``s % 2`` after slice ``s - 1``'s MMAs,
    which frees its set for slice ``s + D``. The loop steps ``D`` slices at a time, so that each
    set is named by a constant. ``t``: the X and W load and store templates, ``at`` fills one in,
    ``mma_step(s)``: slice ``s``'s MMAs, ``steps``: a register array's vectors a slice."""
    def in_set(text: str, r: int) -> str:
        return _in_register_set(text, {a: str(r * n) for a, n in steps.items()} if r else {})

    def load(s: str, r: int) -> str:  # slice s into register set r
        return "\n".join(in_set(at(t[k], s, ""), r) for k in ("x_load", "w_load"))

    def store(r: int, stage: str) -> str:  # register set r into a stage
        return "\n".join(in_set(at(t[k], "", stage), r) for k in ("x_store", "w_store"))

    prologue = [load(str(d), d) for d in range(D)] + [store(0, "0"), load(str(D), 0)]
    body = []
    for j in range(D):
        s, r = f"(ko * {D} + {j})", (j + 1) % D
        body.append(f"""if {s} < {KT}:
{indent(mma_step(s), 4)}
    if {s} + 1 < {KT}:
{indent(store(r, f"({s} + 1) % 2 * {STAGE}"), 8)}
    if {s} + {D + 1} < {KT}:
{indent(load(f"({s} + {D + 1})", r), 8)}
    T.tvm_storage_sync("shared")""")
    return (indent("\n".join(prologue), 16) + '\n                T.tvm_storage_sync("shared")\n'
            f"                for ko in T.serial({-(-KT // D)}):\n" + indent("\n".join(body), 20))


def cluster_stores(out: str, obuf, g: dict, tile, threads: int, stores_at) -> tuple[str, int]:
    """(the statements after the K loop, the fp16 elements of shared memory they use) of a
    workgroup whose split K is summed in its cluster (:data:`CLUSTER_SUM`): its fp32 partial
    tile into its shared memory (``stores_at``: the tile row and column of a thread's first
    accumulator pair, its m16 and n8 fragment counts), a cluster barrier, then every ``KS``-th
    16-byte vector of the tile (from this workgroup's rank ``bz`` on) added up over the
    cluster's shared memories and stored through the epilogue, and a last barrier (no workgroup
    leaves while another reads its memory). The K loop ended with a barrier: the stages are
    free."""
    TM, TN, KS = tile
    M, N = g["m"], g["n"]
    FP = TN * 4 + CLUSTER_PAD  # bytes of a row of partials
    r0, c0, MT, NT = stores_at
    lrow, lcol = f"({r0} + hr * 8)", f"({c0})"
    st = mma.call("tvm_lite_st_f32x2", f"T.address_of(sm[({lrow} * {FP} + {lcol} * 4) // 2])",
                  f"acc[(mt * {NT} + nt) * 4 + hr * 2]", f"acc[(mt * {NT} + nt) * 4 + hr * 2 + 1]")
    V4 = TN // 4  # 16-byte vectors a row
    e = f"((it * {threads} + tx) * {KS} + bz)"  # this thread's vector of the tile
    trow = f"({e} // {V4})"
    at = f"T.address_of(sm[({trow} * {FP} + {e} % {V4} * 16) // 2])"
    part = lambda r: mma.call("tvm_lite_ld_dsmem_f32x4", at, r, ret="float32x4")  # noqa: E731
    gcol = f"bx * {TN} + {e} % {V4} * 4 + i"
    sync = f"T.evaluate({mma.call('tvm_lite_cluster_sync')})"
    text = f'''for mt in T.unroll({MT}):
    for nt in T.unroll({NT}):
        for hr in T.unroll(2):
            T.evaluate({st})
{sync}
tot = T.alloc_buffer((4,), "float32", scope="local")
for it in T.serial({-(-TM * V4 // (KS * threads))}):
    if {e} < {TM * V4}:
        tot[T.Ramp(0, 1, 4)] = {part("T.int32(0)")}
        for r in T.serial(1, {KS}):
            tot[T.Ramp(0, 1, 4)] = tot[T.Ramp(0, 1, 4)] + {part("r")}
        if by * {TM} + {trow} < {M}:
            for i in T.unroll(4):
                {out}[{_row_at(obuf, f"by * {TM} + {trow}", gcol)}] = {EPILOGUE("tot[i]")}
{sync}'''
    return text, -(-TM * FP // 2)


def plan_label(tile, cluster_sum: bool = False, prefetch: int = 1) -> str:
    """The ``tvm_lite.gemm`` label of this kernel at ``tile`` (:func:`choose_tile`'s), with
    ``prefetch`` K slices in flight (:func:`prefetch_of`)."""
    return "mma_m16n8k16 %dx%d split-K %d%s%s" % (
        tile[0], tile[1], tile[4], " cluster" if cluster_sum and tile[4] > 1 else "",
        f" prefetch {prefetch}" if prefetch > 1 else "")


def mma_gemm_kernel(func, target, profile, tile=None, split_k: bool = True,
                    x_async: bool | None = None, lengths=None):
    """The tensor-core kernel for ``func`` as a :class:`tvm.s_tir.Schedule`, or raise
    :class:`MatchError` where it does not apply. ``split_k=False``: never split K; ``x_async``:
    X by ``cp.async`` (default :data:`X_ASYNC`); ``lengths``: the prompt lengths planned for
    where no tile is given (default :data:`PLAN_LENGTHS`, see :func:`lengths_for`)."""
    if not mma.mma_supported(target):
        raise MatchError("mma.sync m16n8k16 needs a CUDA sm_80+ target")
    sch = s_tir.Schedule(func)
    func = sch.mod["main"]
    g = match_gemm(sch, profile, gated_ok=True)
    split_k = split_k and not g["gated"]  # (a gated epilogue needs the whole K in one kernel)
    if tile is not None and (g["n"] % tile[1]
                             or g["k"] % ((tile[5] if len(tile) > 5 else TK) * tile[4])):
        raise MatchError(f"tile {tile} does not divide N={g['n']}, K={g['k']}")
    plans = [(cond, tile or choose_tile(g["n"], profile.compute_units, m=length,
                                         k=g["k"] if split_k else None,
                                         clusters=cluster_target(target)))
             for length, cond in (lengths_for(g["m"], lengths) if tile is None
                                  else [(PLAN_M, None)])]
    cluster = [sums_in_cluster(t, target) for _, t in plans]
    src, label = by_length([(cond, kernel_source(func, g, t, x_async, c),
                             plan_label(t, c, prefetch_of(g, t, x_async)))
                            for (cond, t), c in zip(plans, cluster)])
    helpers = helpers_for([t[4] for (_, t), c in zip(plans, cluster) if c])
    kernel = from_source(src, extra_vars={"T": T, "HELPERS": helpers})
    kernel = attach_epilogue(kernel, func, sch, g["out_dtype"], g["final"], g["matmul_buf"])
    attrs = {k: v for k, v in func.attrs.items()} if func.attrs is not None else {}
    kernel = kernel.with_attrs({**attrs, "tvm_lite.gemm": label})
    return s_tir.Schedule(kernel)


__all__ = ["mma_gemm_kernel", "match_gemm", "choose_tile", "kernel_source", "TILES", "HELPERS",
           "sums_in_cluster", "cluster_target", "helpers_for", "cluster_stores", "prefetch_of",
           "PLAN_LENGTHS", "lengths_for", "by_length"]
