"""Prefill attention on GPUs: query-row tiles x key tiles, online softmax, causal tile skipping.

The rule :class:`.gpu_attention.Attention` calls :func:`prefill_kernel` for an
``attention_prefill`` PrimFunc (``relax_passes/fuse_attention.py``; same signature: ``q (1, H,
n, D)``, the cache views ``k, v (m, KV, D)``, the additive mask ``(1, 1|H, 1|n, m)``, ``out``).

Rows of a tile: (query position, head of the GQA group)
--------------------------------------------------------
A workgroup serves one *kv* head and ``rows`` consecutive rows of the flattened index
``R = pos * G + g`` (``G = H / KV`` query heads share the kv head; query head ``kv * G + g``).
Every K/V tile a workgroup loads is used by all the ``G`` heads of its group (Gemma-2B: 8 heads
read one tile), and the grid is ``KV x ceil(n * G / rows)`` workgroups.

Causal tile skipping
--------------------
The query rows are the last ``n`` of the ``m`` keys (the view ends at ``past_len + n``), so
position ``pos`` may see keys ``j <= m - n + pos``. A tile whose last position is ``p_max`` walks
only the ``ceil((m - n + p_max + 1) / keys)`` first key tiles: tiles above the diagonal are never
loaded. Chunked prompts (``past_len > 0``) get the same bound. The additive mask is still added
inside the tiles walked (padding, windows). The bound holds only for a causal mask, which every
decoder export's is (keys past a row's position are masked, padding included: tvm_lite pads
after the real tokens) but a prefix-LM's or a bidirectional model's is not: each workgroup
first reads the mask element just above each of its rows' diagonal (:func:`_causal_check`) and
walks every key tile when one of them is visible.

Ring caches (sliding-window layers)
-----------------------------------
A ring kernel (``window`` W in the params) reads keys ``j`` in ``[0, m)``, ``m = ring_rows + n``:
``j < ring_rows = min(past, W - 1)`` is the ring's position ``past - ring_rows + j`` (slot:
position mod W), the others the new row ``j - ring_rows`` -- the keys in position order, so the
causal bound above holds as written (``m - n = ring_rows``) and the window is a lower bound: a
workgroup starts at the tile of the first key its first position sees (``j > i + ring_rows -
W``), so key tiles below the window are never loaded either (a 2048-token chunk of a window-512
layer walks at most ~512 + 64 keys per row tile, not 2048). Inside the walked tiles each score
is masked by position (causal and window; there is no mask tensor). After the attention (and the
split merge) one more kernel writes the last ``min(n, W)`` new rows into the ring at ``position
mod W``: reading first is what makes ``W`` rows enough for a chunk of any length.

Two kernels
-----------
* :func:`simt_kernel` (every profile; Adreno/Mali local memory, the generic GPU, CUDA for fp32):
  ``threads = rows * lanes``; thread ``(r, lane)`` owns the output dims ``lane + lanes * t`` of
  row ``r`` (no thread holds a whole row: ``D / lanes`` fp32 accumulators) and the scores of
  keys ``lane + lanes * t``. Per key tile: Q (loaded once), K and V tiles in local memory
  (vectorized, coalesced loads; rows padded by one vector against bank conflicts); scores ->
  local memory; each thread takes its row's max, rescales its accumulators and accumulates
  ``exp(s - max) * V`` over the tile (the row sum on the way). Tile sizes: the largest
  ``rows x keys`` whose Q, K, V and score tiles fit the profile's local-memory budget.
* :func:`tensor_core_kernel` (CUDA, fp16, ``D % 16 == 0``): FlashAttention-2's register
  layout with ``mma.sync.m16n8k16`` (fp16 in, fp32 accumulate) and ``ldmatrix``: each warp owns
  16 rows; ``S = Q Kᵀ`` in registers, the online softmax on the accumulator fragments (row max
  and sum over the 4 threads of a quad by shuffles), ``P`` repacked to fp16 A fragments without
  going through memory, ``O += P V`` (V read with ``ldmatrix.trans``). The PTX is in small
  ``__device__`` helpers (``HELPERS``) called through ``T.cuda.func_call``. Q, K and V tiles live
  in dynamic shared memory (rows padded by 16 bytes: conflict-free ``ldmatrix``). K and V arrive
  by ``cp.async`` in FlashAttention-2's pipeline (V of tile ``kb`` while ``Q Kᵀ`` and the
  softmax of ``kb`` run, K of ``kb + 1`` while ``P V`` of ``kb`` runs; one buffer each), or
  with :data:`TC_SCORES_AHEAD` in FlashAttention-3's order (``Q Kᵀ`` of tile ``kb + 1`` issued
  before the softmax of ``kb``; two buffers each, every copy a tile ahead of its wait). The
  softmax is FlashAttention-2's: scores stay in dot-product units (the mask enters divided by
  the scale), the row max and sum are balanced trees, one FFMA a score feeds ``exp2``. Whole key
  tiles (all but a row tile's last) run without per-key bounds tests, in their scores and in
  their K/V copies, and the per-score index work is hoisted out of the key loop (int32 keys,
  one mask address per row and tile).

All arithmetic of the softmax is fp32 (scores, max, sum, accumulators); P is rounded to fp16 for
the second tensor-core product only (as in FlashAttention).
"""

from __future__ import annotations

import re

from tvm import tirx
from tvm.script import tirx as T

from . import cuda_mma as mma
from ..relax_passes.fuse_attention import (kernel_source, kv_index, mask_index, out_index, parse,
                                           ring_key, ring_visible, score, signature)
from .gpu_attention_decode import ring_write
from .gpu_gemm_wgmma import HELPERS as _WGMMA_HELPERS, wgmma_supported
from .gpu_gemv_half2 import HELPERS as _GEMV_HELPERS, SPLIT_TICKETS

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIN = 'T.min_value("float32")'
LOG2E = 1.4426950408889634  # the tensor-core kernel's softmax: exp(x) = exp2(x * log2 e)
NEG = "T.float32(-1e30)"  # the tensor-core kernel's "no key": finite however the scores are scaled

# Tensor-core kernel: warps per workgroup (16 rows each) and the dynamic shared memory it may use
# (two workgroups fit an H100/H200 SM's 228 KiB; the runtime raises the 48 KiB default).
TC_WARPS = 4
# 16-row m-tiles per warp: with 2 a warp reuses every K and V fragment it loads for 32 rows and a
# workgroup's K/V tile serves 128 rows (FlashAttention-2's layout), for twice the accumulator
# registers. 1 is what the H200 measured fastest (tenth session, an older loop: Llama-1B's shape
# at n = 2048 169 us with 1, 335 with 2). ptxas (nvcc 13, sm_90, sixteenth session's loop),
# registers with 1 / 2 m-tiles at 64-key tiles: Llama-1B's shape 156 / 230, SmolLM2's 149 / 255
# (20 bytes spilled), head_dim 128 166 / 255 (268 bytes spilled), Gemma-2B's 234 / 255 (2.7 KB);
# at 32-key tiles head_dim 128 takes 128 / 252 with no spill: a 128-row workgroup at head_dim
# 128 was never timed (``bench.prefill --parts attention --key-tiles 32 --m-tiles 2`` times it;
# the default stays 1 above TC_M_TILES_MAX_DIM).
TC_M_TILES = 1
TC_M_TILES_MAX_DIM = 64
TC_SHARED_BYTES = 110 * 1024
# Read a key tile's mask elements into registers before its Q Kᵀ products (their load latency
# hides behind the MMAs; NT x 4 more fp32 registers a thread), not where the scores are masked.
# H200, n = 2048, one call (the kernel of commit 3cb847a, before the per-score index work left
# the loop): prefetching took SmolLM2's shape (9/3 heads, head_dim 64) from 101 to
# 70 us, head_dim 128 (32/8) from 266 to 233, Gemma-2B's (8/1, 256) from 152 to 141, but
# Llama-3.2-1B's (32/8, 64) from 156 to 186 us: not at head_dim <= TC_MASK_PREFETCH_SKIP_DIM with
# groups of TC_MASK_PREFETCH_SKIP_GROUP query heads or more. (Re-measured on the eleventh
# session's loop: prefetching still costs Llama-1B's shape 129 -> 131 us.)
TC_MASK_PREFETCH = True
TC_MASK_PREFETCH_SKIP_DIM = 64
TC_MASK_PREFETCH_SKIP_GROUP = 4
TC_KEY_TILES = (64, 32, 16)
# Clean key tiles: before a whole key tile's products, each warp reads the distinct mask rows of
# its rows (its positions: 16 rows of G heads share 16 / G + 1 of them) with consecutive lanes
# on consecutive keys, and one warp vote says whether any element is not 0. A clean tile (below
# the diagonal, no padding: most tiles of a long prompt) adds no mask to its scores; another
# reads the mask per score as before. For a shared (no per-head) mask and GQA groups >= 2, where
# the vote reads fewer elements than the scores would (Llama-1B's shape: 10 loads a lane instead
# of 32). The vote's loads for tile kb + 1 are issued while tile kb is multiplied by V. ptxas
# (local nvcc, sm_90) with it on: registers 128 -> 162 at Llama-1B's shape (4 -> 3 workgroups a
# SM), 164 -> 163 at SmolLM2's, 168 -> 167 at head_dim 128, 250 -> 240 at Gemma-2B's. H200
# (``bench.prefill --parts attention --baseline-kernel``, off as the baseline;
# ``results/issue16_prefill_attention_bounds_s13.json``): n = 2048 faster at every shape (Llama-1B
# 131.7 -> 123.3 us, SmolLM2 67.7 -> 59.9, head_dim 128 224.7 -> 222.1, Gemma-2B 131.4 -> 129.8);
# n = 512 even to slower (Llama-1B 25.9 -> 27.6 us, the others within 1.5 us).
TC_MASK_CLEAN_TILES = True
# Key splitting (chunks after a cache with small grids: few kv heads, short chunks): workgroups
# the grid may reach (two a SM on 132 SMs), at most this many splits, each split at least this
# many key tiles. A prompt is not split (:func:`split_count`).
SPLIT_WAVE = 264
# ... half of that at head_dim 256 and above, where each split's partials (an fp32 row of D a
# query row) cost the merge the most. H200, 2048 tokens in chunks of 256
# (``results/issue16_prefill_split_sweep_s14.json``): Gemma-2B's shape 250.2 -> 237.0 us at a
# wave of 132 (8 -> 4 splits), while the head_dim 64 and 128 shapes lost 7-24% with it.
SPLIT_WAVE_WIDE_HEADS = 132
WIDE_HEAD_DIM = 256
SPLIT_MAX = 8
SPLIT_MIN_TILES = 2
MERGE_THREADS = 256
# The merge kernel: MERGE_VEC dims a thread (one 16-byte load of each split's partial), its loop
# over the splits unrolled to SPLIT_MAX (guarded by the run-time count), so a thread issues every
# split's loads at once. H200, 2048 keys as 8 chunks of 256 against one call (``bench.prefill
# --parts attention --lengths 2048``, ``results/issue16_prefill_attention_merge{1,4}_s14.json``):
# SmolLM2 2.46 -> 2.06x, Llama-1B 1.60 -> 1.46x, head_dim 128 1.42 -> 1.27x, Gemma-2B 2.19 ->
# 1.93x against the one-dim merge with its splits rolled (8.85 us a call in Llama-1B's profile).
MERGE_VEC = 4
# The merge inside the split kernel (FlashAttention-2's split-KV combine, a stream-K fixup): each
# split workgroup writes its partials, takes a ticket (``tvm_lite_split_last``: one atomic a
# workgroup, the counter back at 0 after the last), and the last of a row tile's splits merges
# that tile's rows -- no merge kernel and its launch after each chunk, and the merges of early
# row tiles overlap the splits of later ones. A split happens only for a grid of at most
# SPLIT_WAVE / 2 workgroups, so the tickets (one a row tile) stay far below SPLIT_TICKETS.
# Off until timed (2048 tokens in 256-token chunks, ``bench.prefill --baseline-kernel``).
MERGE_IN_KERNEL = False
# (split, unit) partials the in-kernel merge has in flight at once (:func:`_merge_in_kernel`):
# 8 keeps a chunk's merge (up to SPLIT_MAX splits) at one unit a round, as it was timed, and
# gives a prompt's (PROMPT_SPLITS) 4 units a round: its 64 rows of head_dim 64 in 2 round trips
# to L2, not 8.
MERGE_IN_FLIGHT = 8
# ... on by default at head_dim <= MERGE_IN_KERNEL_MAX_DIM, with MERGE_IN_FLIGHT_SMALL_DIMS in
# flight. H100, twenty-third session (``bench.prefill --parts attention --lengths 512,2048
# --switch merge_in_f16:MERGE_IN_KERNEL=True,MERGE_IN_FLIGHT=16``,
# ``results/issue16_chunks_gemm256_attention_h100_s23.json``), us, one call and 2048 as 8 x 256,
# the tree then / the switch: SmolLM2 512 18.0 / 15.2, 2048 53.7 / 52.4, its chunks 126.7 /
# 137.3; Llama-1B 512 19.6 / 17.8, 2048 107.7 / 103.8, its chunks 187.4 / 188.9. Head_dim 64
# takes it: one call is faster, and the chunks' GPU time is within 1% (Llama-1B) or 8% (SmolLM2)
# while a merge kernel and its launch go from every layer of every chunk (in the whole model a
# kernel boundary costs ~2.3 us, the twenty-third session's profile). Head_dim 128 and 256 keep
# the merge kernel: their chunks took 8% and 27% longer with the switch (309.7 / 285.9 us,
# 314 / 248).
MERGE_IN_KERNEL_MAX_DIM = 64
MERGE_IN_FLIGHT_SMALL_DIMS = 16
assert max(SPLIT_WAVE, SPLIT_WAVE_WIDE_HEADS) // 2 <= SPLIT_TICKETS, "tickets: one a row tile"
# Prompt splits: a prompt (one call, ``m < 2 n``) whose grid is at most PROMPT_SPLIT_GRID
# workgroups has its keys split PROMPT_SPLITS ways too, merged by the last split of each row tile
# (the in-kernel merge above: a prompt's partials stay in L2, and no merge kernel runs; a
# chunk's splits keep the merge kernel unless MERGE_IN_KERNEL). Why: such a grid is at most two
# workgroups a SM, so one call lasts as long as its longest row tile, which walks every key
# tile alone (SmolLM2's shape at n = 2048: 288 workgroups, the last ones 32 key tiles against
# an average of 16; Gemma-2B's: 256, each on its own slot). A list-scheduling model
# (``python -m tvm_lite.bench.grid_model``) puts one call at n = 2048 1.16-1.55x (SmolLM2, 264
# or 396 resident workgroups) and 1.91-1.97x (Gemma-2B) faster with 2 splits. The thirteenth
# session took prompt splits out (n = 512, with the merge kernel before its MERGE_VEC rewrite:
# the partials' write and the merge cost more than they saved). Timed on an H100 (twenty-second
# session, one call at n = 2048, ``bench.prefill --parts attention --lengths 2048 --switch
# prompt2:PROMPT_SPLITS=2 --switch longest_prompt2:LONGEST_FIRST_ACROSS_HEADS=True,PROMPT_SPLITS=2``;
# ``results/issue16_chunked_prefill_by_length_h100_s22.json``), us, tree / splits alone / with
# LONGEST_FIRST_ACROSS_HEADS: SmolLM2 53.3 / 58.4 / 53.3, Llama-1B 121.3 / 126.1 / 107.5, head_dim
# 128 214.8 / 214.3 / 194.8, Gemma-2B 126.7 / 118.2 / 118.5. On, with the order below, from 1024
# keys: n = 512 was not timed with it, and keeps the unsplit kernel.
PROMPT_SPLITS = 2
PROMPT_SPLIT_GRID = 2 * SPLIT_WAVE
PROMPT_SPLIT_MIN_KEYS = 1024  # ... and at least this many keys (1024 splits 2048, not 512)
assert PROMPT_SPLIT_GRID <= SPLIT_TICKETS, "tickets: one a row tile"
# Q's A fragments kept in registers for the whole key loop (FlashAttention-2's layout) instead of
# read from shared memory again by ``ldmatrix`` for every key tile: ``MT x D / 16 x 4`` more
# registers a thread (16 at head_dim 64, 32 at 128), one ldmatrix in 9 fewer a tile at head_dim
# 128 and its latency off the start of each Q Kᵀ. Two workgroups of 128 threads a SM leave
# 256 registers a thread, so at head_dim <= TC_Q_REGISTERS_MAX_DIM it costs no occupancy
# (head_dim 256: 64 more, Gemma-2B's shape would spill). Measured on the H200 (session 18,
# ``bench.prefill --parts attention --baseline-kernel`` with a copy that had it off:
# ``results/issue16_prefill_attention_variants_s18.json``): one call at n = 2048 SmolLM2
# 60.2 -> 54.3 us, Llama-1B 124.6 -> 120.6, head_dim 128 222.4 -> 214.6; at n = 512 within
# +-3%; 2048 as 8 x 256 within +-2%.
TC_Q_REGISTERS = True
TC_Q_REGISTERS_MAX_DIM = 128
# The output of an unsplit call stored two neighbouring dims a 4-byte store
# (``tvm_lite_st_f16x2``) instead of one fp16 at a time: a warp's store then writes 16 bytes of
# each of 8 rows, not 8. ncu of the head_dim 128 kernel at n = 2048 (H100, twenty-sixth session,
# ``results/ncu_prefill_attention_hd128_h100_s26.txt``): its global stores used 8 of each 32-byte
# sector's bytes. Timed on an H100 (twenty-eighth session, ``bench.prefill --parts attention
# --lengths 512,2048 --switch pairs:TC_PAIR_STORES=True``,
# ``results/issue16_attention_pair_stores_h100_s28.json``), one call, us, one at a time / pairs:
# n = 2048 SmolLM2 52.6 / 53.0, Llama-1B 103.0 / 97.9, head_dim 128 194.5 / 181.7, Gemma-2B
# 119.9 / 120.9; n = 512 15.2 / 14.4, 17.6 / 15.6, 29.0 / 25.2, 34.7 / 32.0. On.
TC_PAIR_STORES = True
# ... and a split's fp32 partials (chunks after a cache, prompts split in two) the same way: a
# thread's two neighbouring dims in one 8-byte store, so a warp writes whole 32-byte sectors of
# 8 rows where it writes half of each. On an H100 (twenty-ninth session, ``bench.prefill --parts
# attention --lengths 512,2048 --switch pp:TC_PAIR_PARTIALS=True``,
# ``results/issue16_attention_pair_partials_h100_s29.json``): 2048 tokens in 256-token chunks /
# one call 2.60 -> 2.46x (SmolLM2), 1.92 -> 1.78x (Llama-1B), 1.58 -> 1.48x (head_dim 128),
# 1.96 -> 1.90x (Gemma-2B); Gemma-2B's split 2048-token call 121.1 -> 108.1 us, SmolLM2's 52.4
# -> 49.7, Llama-1B's 97.5 -> 99.9. Whole step (``tvm_lite.profile --switch``,
# ``..._profile_smollm2_h100_s29.json``, ``..._profile_llama1b_h100_s29.json``): SmolLM2's
# chunks 16.66 -> 16.12 ms, one call 6.73 -> 6.51; Llama-1B's 22.05 -> 22.16 and 15.63 -> 15.50.
TC_PAIR_PARTIALS = True
# An unsplit call's output staged through shared memory: each warp writes its rows' fp16 pairs
# into its own rows of Q's tile (dead once its key loop is done: a warp's Q fragments come from
# its own rows only), then stores them 16 bytes a thread, a warp writing whole row segments
# (``D * 2`` bytes a row) where the paired stores write 16 bytes of each of 8 rows. In place of
# TC_PAIR_STORES where on; not with wgmma (its Q tile is laid out as core matrices). Off until
# timed (``bench.prefill --parts attention --switch staged:TC_STAGED_STORES=True``).
TC_STAGED_STORES = False
# Scores a tile ahead (FlashAttention-3's order, with mma.sync): the Q Kᵀ products of key tile
# kb + 1 are issued before the softmax of tile kb, so that a warp's tensor-core work overlaps
# its own softmax instead of only the other warps'; then P V of tile kb. Two K and two V
# buffers (each copy two tiles ahead of its reads, one barrier a tile instead of two) and a
# second score tile in registers (MT x keys / 8 x 4 a thread). Off until timed (``bench.prefill
# --parts attention --baseline-kernel``, a copy with it on).
TC_SCORES_AHEAD = False
# Both products on Hopper's warpgroup tensor cores (``wgmma``, CUDA sm_90a): the workgroup's 4
# warps are one warpgroup of 64 rows (8 warps: two, 128 rows sharing each K and V tile). Q Kᵀ reads Q and K from shared memory through descriptors
# (no ldmatrix through registers: with mma.sync each K and V fragment a warp loads feeds only its
# 16 rows, and shared-memory bandwidth, not the tensor cores, bounds the kernel at head_dim 128
# and 256), P V takes P from registers and V from shared memory (its descriptor transposed). Q, K
# and V tiles are stored as wgmma's no-swizzle core matrices (:func:`core_matrix_index`). One
# m-tile a warp; with TC_SCORES_AHEAD, FlashAttention-3's intra-warpgroup overlap: tile kb + 1's
# Q Kᵀ runs on the tensor cores while tile kb's softmax runs. Off until timed (a copy with it
# on, on an sm_90a target: ``bench.prefill --parts attention --baseline-kernel``).
TC_WGMMA = False

# The order workgroups start in. A GPU starts them in the order of their linear index
# (blockIdx.x fastest), and under a causal mask a row tile's work grows with its last position:
# the tensor-core kernel has always numbered its row tiles last-first (``bq = nb - 1 - bqr``),
# but the kv head was blockIdx.y, so every kv head's longest row tiles waited for all the row
# tiles of the heads before it (Llama-1B's shape at n = 2048: 8 kv heads x 128 row tiles on
# ~264 resident workgroups, and kv head 7's longest tiles start ~900th). With this on, the kv
# head is blockIdx.x and the row tile blockIdx.y (both kernels; the SIMT kernel's row tiles
# last-first too): the longest row tiles of every head start first. A list-scheduling model
# (``python -m tvm_lite.bench.grid_model``: each workgroup's time = its key tiles + 0.5, 264 or
# 396 resident) puts one call at n = 2048 1.20-1.23x faster for 8 kv heads (Llama-1B, head_dim 128) and unchanged for SmolLM2 (288
# workgroups) and Gemma-2B (one kv head). Timed with PROMPT_SPLITS on an H100 (see there): one
# call at n = 2048 Llama-1B 121.3 -> 107.5 us, head_dim 128 214.8 -> 194.8 us. On. A grid that
# fits the resident workgroups at once starts them all in either order (on the H100/H200, at
# two workgroups a SM, every benchmarked shape's at n = 512: at most 256 of 264).
LONGEST_FIRST_ACROSS_HEADS = True


def grid_tags() -> tuple[str, str]:
    """The thread tags of the prefill kernels' kv head and row tile
    (:data:`LONGEST_FIRST_ACROSS_HEADS`); a split is blockIdx.z."""
    if LONGEST_FIRST_ACROSS_HEADS:
        return "blockIdx.x", "blockIdx.y"
    return "blockIdx.y", "blockIdx.x"


def grid(kv_heads: int, row_tiles: int, splits: int = 1) -> tuple[int, int, int]:
    """The launch grid (x, y, z) of a prefill kernel (tests that run its CUDA C on the CPU)."""
    x, _ = grid_tags()
    return (kv_heads, row_tiles, splits) if x == "blockIdx.x" else (row_tiles, kv_heads, splits)


HELPERS = {
    **mma.HELPERS,
    "tvm_lite_quad_max": r"""
__forceinline__ __device__ float tvm_lite_quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
""",
    # 2^x in one MUFU.EX2 (denormal results flushed to 0): exp2f's range handling around it
    # (a compare and two predicated multiplies) was a fifth of the key loop's non-MMA work
    "tvm_lite_ex2": r"""
__forceinline__ __device__ float tvm_lite_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
""",
    "tvm_lite_warp_none": r"""
__forceinline__ __device__ int tvm_lite_warp_none(int v) {
  return __all_sync(0xffffffffu, v == 0);  // 1: no lane of the warp has v set
}
""",
    "tvm_lite_quad_sum": r"""
__forceinline__ __device__ float tvm_lite_quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
""",
    # the in-kernel merge (MERGE_IN_KERNEL): another SM's partials, read from L2
    "tvm_lite_split_last": _GEMV_HELPERS["tvm_lite_split_last"],
    "tvm_lite_ldcg_f32": _GEMV_HELPERS["tvm_lite_ldcg_f32"],
    "tvm_lite_ldcg_f32x4": r"""
__forceinline__ __device__ void tvm_lite_ldcg_f32x4(float* dst, const float* p) {
  *reinterpret_cast<float4*>(dst) = __ldcg(reinterpret_cast<const float4*>(p));
}
""",
}


def _wgmma_helper(n: int, a_in_registers: bool) -> str:
    """CUDA source of a warpgroup MMA ``d += A @ B`` (m64 n``n`` k16, fp16 in, fp32 accumulate),
    B from shared memory through a no-swizzle descriptor:

    * ``tvm_lite_wgmma_ss_m64n{n}k16(d, a, b, a_lbo, b_lbo)``: A from shared memory too, both
      K-major, core matrices 128 bytes apart in M / N and ``*_lbo`` bytes in K;
    * ``tvm_lite_wgmma_rs_m64n{n}k16_tb(d, a0, a1, a2, a3, b, b_lbo, b_sbo)``: A from registers
      (each warp its 16 rows, mma.sync's A fragment), B MN-major (``imm-trans-b`` 1): core
      matrices of 8 K rows x 16 bytes of N, ``b_lbo`` bytes apart in K and ``b_sbo`` in N.

    Descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 address >> 4, 16-29 LBO >> 4,
    32-45 SBO >> 4, 62-63 swizzle (0)."""
    regs = n // 2
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    lst = ", ".join(f"%{i}" for i in range(regs))
    desc = ("((unsigned long long)((((unsigned)__cvta_generic_to_shared({p}) & 0x3FFFF) >> 4) | "
            "(((({l}) & 0x3FFFF) >> 4) << 16)) | ((unsigned long long)((({s}) & 0x3FFFF) >> 4) << 32))")
    if not a_in_registers:
        return f"""
__forceinline__ __device__ void tvm_lite_wgmma_ss_m64n{n}k16(float* d, const void* a, const void* b,
                                                          unsigned a_lbo, unsigned b_lbo) {{
  unsigned long long da = {desc.format(p="a", l="a_lbo", s="128u")};
  unsigned long long db = {desc.format(p="b", l="b_lbo", s="128u")};
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{lst}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}"
               : {outs} : "l"(da), "l"(db), "r"(1));
}}
"""
    return f"""
__forceinline__ __device__ void tvm_lite_wgmma_rs_m64n{n}k16_tb(float* d, unsigned a0, unsigned a1,
                                                             unsigned a2, unsigned a3, const void* b,
                                                             unsigned b_lbo, unsigned b_sbo) {{
  unsigned long long db = {desc.format(p="b", l="b_lbo", s="b_sbo")};
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 5}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{lst}}}, {{%{regs}, %{regs + 1}, %{regs + 2}, %{regs + 3}}}, %{regs + 4}, p, 1, 1, 1;\\n}}"
               : {outs} : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(1));
}}
"""


for _n in range(16, 257, 16):  # keys (Q Kᵀ) and head_dim (P V) of a tile
    HELPERS[f"tvm_lite_wgmma_ss_m64n{_n}k16"] = _wgmma_helper(_n, False)
    HELPERS[f"tvm_lite_wgmma_rs_m64n{_n}k16_tb"] = _wgmma_helper(_n, True)
for _name in ("tvm_lite_wgmma_fence", "tvm_lite_wgmma_commit", "tvm_lite_wgmma_wait0",
              "tvm_lite_fence_async_shared"):
    HELPERS[_name] = _WGMMA_HELPERS[_name]


def core_matrix_index(rows: int):
    """``layout(r, c)`` (:func:`_load_tile`) of a ``rows x D`` fp16 tile stored as wgmma's
    no-swizzle core matrices: 8 rows x 8 columns each, a row's 8 columns 16 contiguous bytes, a
    matrix 128 contiguous bytes; matrices adjacent in rows 128 bytes apart, adjacent in columns
    ``rows x 16 + 16`` bytes apart (:func:`core_matrix_stride`: the 16 bytes of skew put the
    8-column groups of one row, which the warp's 16-byte copies write together, in different
    banks). As a descriptor: K-major (Q, K: K = columns) or MN-major (V: K = rows)."""
    stride = core_matrix_stride(rows) // 2
    return lambda r, c: f"({c}) // 8 * {stride} + ({r}) // 8 * 64 + ({r}) % 8 * 8"


def core_matrix_stride(rows: int) -> int:
    """Bytes between core matrices adjacent in columns (:func:`core_matrix_index`)."""
    return rows * 16 + 16


_call = mma.call


def _rows(p: dict, rows: int, r: str) -> dict:
    """Index expressions of tile row ``r`` of workgroup ``(kvh, bq)``: flattened row, query
    position, query head."""
    G = p["heads"] // p["kv_heads"]
    row = f"(bq * {rows} + {r})"
    return dict(row=row, pos=f"({row} // {G})", head=f"(kvh * {G} + {row} % {G})")


def _key_tiles(p: dict, rows: int, keys: int) -> str:
    """Key tiles workgroup ``bq`` walks: up to the causal bound of its last position -- all of
    them where :func:`_causal_check` found the mask not causal (``cw[0] == 0``)."""
    G = p["heads"] // p["kv_heads"]
    last = f"T.min(n - 1, (bq * {rows} + {rows - 1}) // {G})"
    bound = f"T.min((m + {keys - 1}) // {keys}, (m - n + {last} + {keys}) // {keys})"
    if p.get("window"):  # a ring masks by position: causal by construction
        return bound
    return f"T.if_then_else(cw[0] == 1, {bound}, (m + {keys - 1}) // {keys})"


# A mask element above this is taken as "visible" by the causality check (masked keys are the
# dtype's lowest value, -inf or a large negative bias such as -1e4 or -1e9)
CAUSAL_MASKED_BELOW = -1000.0


def _causal_check(p: dict, rows: int, threads: int, mask_at) -> tuple[str, str]:
    """TIR text that sets ``cw[0]`` to 1 when, for every row of workgroup ``bq``, the mask element
    just above its diagonal (key ``m - n + pos + 1``) is masked, else 0: the causal tile bound
    (:func:`_key_tiles`) holds only for a causal mask, and the kernels read the export's mask
    (a prefix-LM's is bidirectional over its prefix; a mask without a row axis, padding only,
    over everything). It assumes a row that sees keys above its diagonal sees the next one: true
    of causal, prefix-LM, bidirectional and end-padded masks (a row whose next key is padding
    is the last real one: the tiles up to it hold every real key). One load a row, two barriers
    a workgroup. Two parts: the first (before the Q tile's load) issues the loads, the second
    (after it) decides, so their latency hides behind the Q tile's.
    ``mask_at(head, pos, key)``: the mask element's expression. Empty for a ring kernel."""
    if p.get("window"):
        return "", ""
    at = _rows(p, rows, "tx")
    pos = f"T.min({at['pos']}, n - 1)"
    key = f"m - n + {pos} + 1"
    assert rows <= threads
    first = f"""
                cs = T.alloc_buffer((1,), "int32", scope="shared")
                cw = T.alloc_buffer((1,), "int32", scope="local")
                cv = T.alloc_buffer((1,), "float32", scope="local")
                if tx == 0:
                    cs[0] = 1
                cv[0] = T.float32({2 * CAUSAL_MASKED_BELOW})
                if tx < {rows} and {key} < m:
                    cv[0] = T.Cast("float32", {mask_at(at["head"], pos, key)})
                T.tvm_storage_sync("shared")"""
    second = f"""
                if cv[0] > T.float32({CAUSAL_MASKED_BELOW}):
                    cs[0] = 0
                T.tvm_storage_sync("shared")
                cw[0] = cs[0]"""
    return first, second


def _first_key_tile(p: dict, rows: int, keys: int) -> str:
    """The first key tile workgroup ``bq`` walks: 0, or with a ring (``window``) the tile of the
    first key inside the window of its first position (tiles below the window are never
    loaded)."""
    if not p.get("window"):
        return "T.int64(0)"
    G = p["heads"] // p["kv_heads"]
    first = f"(bq * {rows}) // {G}"
    return f"T.max(T.int64(0), {first} + ring_rows + {1 - p['window']}) // {keys}"


def _load_tile(dsts: list, srcs, dtype: str, count_rows: int, D: int, pad: int, vec: int,
               threads: int, valid, indent: str, alt=None, async_copy: bool = False,
               all_valid: str | None = None, layout=None) -> str:
    """Cooperative vectorized copy of a ``(count_rows, D)`` tile into the 1-D buffers ``dsts``
    (``(name, " + offset")`` pairs; rows ``D + pad`` apart: a 2-D buffer would be compacted to
    the columns accessed, dropping the padding); rows that are not ``valid(r)`` get zeros.
    ``srcs(r, c)``: the sources at row ``r``, column ramp
    ``c``, one per destination; ``alt = (cond(r), srcs2)``: rows where ``cond`` holds read
    ``srcs``, the others ``srcs2`` (a ring kernel's keys: ring rows, then new rows).

    ``async_copy``: each vector is a 16-byte ``cp.async`` from global to shared memory
    (``vec * 2 == 16``; ``srcs`` then gets the first column, not a ramp): the copy is in flight
    until the thread's next ``tvm_lite_cp_async_wait_all``, so loads of the next tile overlap the
    tensor-core work on this one.

    ``all_valid``: a condition under which every row is valid; where it holds the copy runs
    without the per-row test and the zero fill (a key tile wholly below ``m``: its copies are a
    constant offset apart, no 64-bit compare and predicated store each).

    ``layout(r, c)``: the element index of row ``r``, column ``c`` (a multiple of ``vec``) in the
    tile, where it is not ``r * (D + pad) + c`` (the wgmma kernel's core matrices:
    :func:`core_matrix_index`)."""
    vectors = count_rows * D // vec
    steps = -(-vectors // threads)
    e = f"(l * {threads} + tx)"
    col = f"{e} % {D // vec} * {vec}"
    r, c = f"({e} // {D // vec})", (col if async_copy else f"T.Ramp({col}, 1, {vec})")
    guard = f"{e} < {vectors}" if steps * threads != vectors else "True"
    body = [f"for l in range({steps}):", f"    if {guard}:", f"        if {valid(r)}:"]
    at = layout(r, col) if layout else f"{r} * {D + pad} + {col}"

    def copy(d, off, x):
        if async_copy:
            dst, src = f"T.address_of({d}[{at}{off}])", f"T.address_of({x})"
            return f"T.evaluate({mma.call('tvm_lite_cp_async16', dst, src)})"
        return f"{d}[T.Ramp({at}{off}, 1, {vec})] = {x}"

    if alt is None:
        body += [f"            {copy(d, off, x)}" for (d, off), x in zip(dsts, srcs(r, c))]
    else:
        for head, src in ((f"if {alt[0](r)}:", srcs), ("else:", alt[1])):
            body += [f"            {head}"]
            body += [f"                {copy(d, off, x)}" for (d, off), x in zip(dsts, src(r, c))]
    body += ["        else:"]
    body += [f'            {d}[T.Ramp({at}{off}, 1, {vec})] = T.Broadcast(T.Cast("{dtype}", 0), '
             f'{vec})' for d, off in dsts]
    if all_valid is not None and alt is None:
        fast = [f"for l in range({steps}):", f"    if {guard}:"]
        fast += [f"        {copy(d, off, x)}" for (d, off), x in zip(dsts, srcs(r, c))]
        body = ([f"if {all_valid}:"] + ["    " + ln for ln in fast] + ["else:"]
                + ["    " + ln for ln in body])
    return "\n".join(indent + line for line in body)


def _q_load(p: dict, rows: int, dtype: str, D: int, pad: int, vec: int, threads: int,
            tile: tuple, async_copy: bool = False, layout=None) -> str:
    """The Q tile load (once per workgroup; rows past ``n * G`` zero; ``async_copy``: by
    ``cp.async``, landing at the thread's next wait)."""
    G = p["heads"] // p["kv_heads"]

    def q_src(r, c):
        at = _rows(p, rows, r)
        return [f"q[0, {at['head']}, {at['pos']}, {c}]"]

    return _load_tile([tile], q_src, dtype, rows, D, pad, vec, threads,
                      lambda r: f"{_rows(p, rows, r)['row']} < n * {G}", " " * 16,
                      async_copy=async_copy, layout=layout)


def _kv_load(p: dict, keys: int, dtype: str, D: int, pad: int, vec: int, threads: int,
             tiles: tuple, which: str = "kv", kb: str = "kb", indent: int = 20,
             async_copy: bool = False, layout=None) -> str:
    """The load of key tile ``kb`` (keys past ``m`` zero) of K and/or V (``which``) into
    ``tiles`` (their (buffer, offset)s); a ring kernel reads ring rows, then new rows."""
    key = lambda r: f"({kb}) * {keys} + {r}"  # noqa: E731

    def kv_src(r, c):
        return [kv_index(p, x, key(r), "kvh", c) for x in which]

    alt = None
    if p.get("window"):  # keys [0, ring_rows): the ring, oldest first; then the new rows
        def kv_src(r, c):  # noqa: F811
            return [kv_index(p, x, ring_key(p, key(r))[0], "kvh", c) for x in which]

        alt = (lambda r: f"{key(r)} < ring_rows",
               lambda r, c: [f"n{x}[0, kvh, {ring_key(p, key(r))[1]}, {c}]" for x in which])
    return _load_tile(list(tiles), kv_src, dtype, keys, D, pad, vec, threads,
                      lambda r: f"{key(r)} < m", " " * indent, alt, async_copy,
                      f"({kb} + 1) * {keys} <= m", layout)


def _tile_loads(p: dict, rows: int, keys: int, dtype: str, D: int, pad: int, vec: int,
                threads: int, tiles: tuple) -> tuple[str, str]:
    """The Q tile load and the K/V loads of key tile ``kb``. ``tiles``: the (buffer, offset) of
    Q, K, V."""
    return (_q_load(p, rows, dtype, D, pad, vec, threads, tiles[0]),
            _kv_load(p, keys, dtype, D, pad, vec, threads, tiles[1:]))


def simt_tiles(p: dict, threads: int, local_bytes: int, vec: int) -> tuple[int, int]:
    """(rows, keys) of the SIMT kernel: the largest tile whose Q, K, V (padded rows) and fp32
    score tiles fit ``local_bytes``, with ``threads / rows`` lanes dividing ``head_dim``."""
    D, b = p["head_dim"], _BYTES.get(p["dtype"], 4)
    best = None
    for rows in (64, 32, 16, 8, 4, 2, 1):
        if rows > threads or threads % rows or D % (threads // rows):
            continue
        for keys in (64, 32, 16, 8, 4, 2, 1):
            need = (rows + 2 * keys) * (D + vec) * b + rows * (keys + 1) * 4
            if need <= local_bytes:
                if best is None or rows * keys > best[0] * best[1]:
                    best = (rows, keys)
                break
    if best is None:
        raise ValueError(f"prefill attention: head_dim {D} does not fit {local_bytes} bytes of "
                         f"local memory with {threads} threads")
    return best


def simt_kernel(p: dict, threads: int, local_bytes: int, vector_bytes: int,
                static: dict | None = None) -> tirx.PrimFunc:
    """The SIMT kernel (module doc); ``static``: sizes made constants (``kernel_source``)."""
    decl, _ = signature(p)
    H, KV, D = p["heads"], p["kv_heads"], p["head_dim"]
    G, dt, f32 = H // KV, p["dtype"], "T.float32"
    b = _BYTES.get(dt, 4)
    vec = max(1, min(vector_bytes // b, 8))
    while D % vec:
        vec //= 2
    rows, keys = simt_tiles(p, threads, local_bytes, vec)
    lanes = threads // rows
    dims = D // lanes  # output dims per thread
    per = -(-keys // lanes)  # scores per thread per key tile
    DP = D + vec
    me = _rows(p, rows, "tx // %d" % lanes)
    lane = f"(tx % {lanes})"
    key_in = f"({lane} + {lanes} * t)"
    unroll_d = "T.unroll" if D <= 128 else "T.serial"
    q_load, kv_load = _tile_loads(p, rows, keys, dt, D, vec, vec, threads,
                                  (("qs", ""), ("ks", ""), ("vs", "")))
    mask = mask_index(p, me["head"], f"T.min({me['pos']}, n - 1)", f"kb * {keys} + {key_in}")
    causal, decided = _causal_check(p, rows, threads, lambda h, i, j: mask_index(p, h, i, j))
    nb = f"((n * {G} + {rows - 1}) // {rows})"  # row tiles
    kv_tag, bq_tag = grid_tags()
    src = kernel_source(p, decl, f'''    for kvh in T.thread_binding({KV}, thread="{kv_tag}"):
        for bqr in T.thread_binding({nb}, thread="{bq_tag}"):
            for tx in T.thread_binding({threads}, thread="threadIdx.x"):
                qs = T.alloc_buffer(({rows * DP},), "{dt}", scope="shared")
                ks = T.alloc_buffer(({keys * DP},), "{dt}", scope="shared")
                vs = T.alloc_buffer(({keys * DP},), "{dt}", scope="shared")
                ss = T.alloc_buffer(({rows}, {keys + 1}), "float32", scope="shared")
                acc = T.alloc_buffer(({dims},), "float32", scope="local")
                st = T.alloc_buffer((4,), "float32", scope="local")  # max, sum, score/new max, p{causal}
{q_load}{decided}
                kr = T.alloc_buffer((2,), "int64", scope="local")  # key tiles, computed once
                kr[0] = {_first_key_tile(p, rows, keys)}
                kr[1] = {_key_tiles(p, rows, keys)}
                for t in T.unroll({dims}):
                    acc[t] = {f32}(0)
                st[0] = {MIN}
                st[1] = {f32}(0)
                for kb in range(kr[0], kr[1]):
{kv_load}
                    T.tvm_storage_sync("shared")
                    for t in range({per}):
                        if {key_in} < {keys}:
                            st[2] = {f32}(0)
                            for d in {unroll_d}({D}):
                                st[2] = st[2] + {f32}(qs[tx // {lanes} * {DP} + d]) * \\
                                    {f32}(ks[{key_in} * {DP} + d])
                            ss[tx // {lanes}, {key_in}] = T.if_then_else(
                                kb * {keys} + {key_in} < m and {me["pos"]} < n
                                and {ring_visible(p, me["pos"], f"kb * {keys} + {key_in}")},
                                {score(p, "st[2]", mask)}, {MIN})
                    T.tvm_storage_sync("shared")
                    st[2] = st[0]
                    for j in range({keys}):
                        st[2] = T.max(st[2], ss[tx // {lanes}, j])
                    st[3] = T.exp(st[0] - st[2])
                    st[1] = st[1] * st[3]
                    for t in T.unroll({dims}):
                        acc[t] = acc[t] * st[3]
                    st[0] = st[2]
                    for j in range({keys}):
                        st[3] = T.exp(ss[tx // {lanes}, j] - st[0])
                        st[1] = st[1] + st[3]
                        for t in T.unroll({dims}):
                            acc[t] = acc[t] + st[3] * {f32}(vs[j * {DP} + {lane} + {lanes} * t])
                    T.tvm_storage_sync("shared")
                if {me["pos"]} < n:
                    for t in T.unroll({dims}):
                        {out_index(p, me["head"], me["pos"], f"{lane} + {lanes} * t")} = T.Cast(
                            "{dt}", acc[t] / T.max(st[1], T.float32(1e-30)))
{ring_write(p, threads) if p.get("window") else ""}''', static)
    # row tile bq: in launch order, or the longest (last rows) first
    src = re.sub(r"\bbq\b", f"({nb} - 1 - bqr)" if LONGEST_FIRST_ACROSS_HEADS else "bqr", src)
    return parse(src, static, HELPERS=HELPERS)


def m_tiles_for(p: dict, m_tiles: int | None = None) -> int:
    """16-row m-tiles a warp owns: ``m_tiles`` where given (sweeps: ``bench.prefill
    --m-tiles``), else :data:`TC_M_TILES`, 1 above :data:`TC_M_TILES_MAX_DIM`."""
    if m_tiles:
        return m_tiles
    return 1 if p["head_dim"] > TC_M_TILES_MAX_DIM else TC_M_TILES


def tensor_core_tiles(p: dict, shared_bytes: int = TC_SHARED_BYTES,
                      m_tiles: int | None = None, kv_buffers: int | None = None
                      ) -> tuple[int, int]:
    """(rows, keys) of the tensor-core kernel: ``16 x m_tiles`` rows a warp, the largest key
    tile of :data:`TC_KEY_TILES` whose Q tile and ``kv_buffers`` K and V tiles (2: one each; 4
    with :data:`TC_SCORES_AHEAD`, the default where it is on) fit ``shared_bytes``."""
    D = p["head_dim"]
    kv_buffers = kv_buffers or (4 if TC_SCORES_AHEAD else 2)
    rows = 16 * TC_WARPS * m_tiles_for(p, m_tiles)
    for keys in TC_KEY_TILES:
        if (rows + kv_buffers * keys) * (D + 8) * 2 <= shared_bytes:
            return rows, keys
    raise ValueError(f"prefill attention: head_dim {D} does not fit {shared_bytes} bytes")


def tensor_core_applies(p: dict, target) -> bool:
    """fp16, head_dim a multiple of 16 up to 256, and ``mma.sync.m16n8k16`` on the target
    (sm_80 or newer; a CUDA target without an arch is taken to be one)."""
    return (mma.mma_supported(target) and p["dtype"] == "float16" and p["head_dim"] % 16 == 0
            and p["head_dim"] <= 256)


def split_count(p: dict, rows: int, keys: int) -> str:
    """The number of key splits, as an expression of ``n`` and ``m`` (evaluated at run time:
    both are dynamic): at most ``SPLIT_MAX``, each split ``SPLIT_MIN_TILES`` key tiles or more,
    1 where the grid is large enough. Below that, how many depends on the balance of the work:

    * a call whose rows see different numbers of keys (``m < 2 n``: a prompt, its first chunk)
      is not split. It used to be split up to ``SPLIT_WAVE`` workgroups (the last rows walk
      the most key tiles), but the partials' write and the merge cost more than they saved.
      H200, n = 512 (``results/issue16_prefill_attention_nosplit512_s13.json``): Llama-1B's
      shape 27.8 -> 18.5 us (2 splits -> 1), head_dim 128 47.7 -> 30.0, Gemma-2B's 36.3 -> 32.3
      (5 -> 1), SmolLM2's 17.9 -> 15.8 (4 -> 1);
    * a chunk after a cache at least as long as itself (``m >= 2 n``: every row walks about the
      same tiles) rounds down, to at most one wave (half a wave at head_dim >= 256,
      :data:`SPLIT_WAVE_WIDE_HEADS`): a grid one wave and a half long runs two.
      H200, 2048 tokens in 256-token chunks (``results/issue16_prefill_split_sweep_s11.json``):
      head_dim 128 (32/8) 405 -> 293 us (3 -> 2 splits of 128 workgroups), Llama-1B's shape
      205 -> 194 us.

    :func:`split_value` evaluates it in Python."""
    G, KV = p["heads"] // p["kv_heads"], p["kv_heads"]
    grid = f"({KV} * ((n * {G} + {rows - 1}) // {rows}))"
    cap = SPLIT_WAVE_WIDE_HEADS if p["head_dim"] >= WIDE_HEAD_DIM else SPLIT_WAVE
    prompt = "T.int64(1)"
    if PROMPT_SPLITS > 1:  # a prompt's splits (:data:`PROMPT_SPLITS`) where its grid is small
        small = f"{grid} <= {PROMPT_SPLIT_GRID}" + (
            f" and m >= {PROMPT_SPLIT_MIN_KEYS}" if PROMPT_SPLIT_MIN_KEYS else "")
        prompt = f"T.if_then_else({small}, T.int64({PROMPT_SPLITS}), T.int64(1))"
    wave = f"T.if_then_else(m >= 2 * n, T.max(T.int64(1), {cap} // {grid}), {prompt})"
    return (f"T.max(T.int64(1), T.min(T.min(T.int64({SPLIT_MAX}), {wave}), "
            f"(m + {keys - 1}) // {keys} // {SPLIT_MIN_TILES}))")


class _PyT:
    """The ``T.`` names :func:`split_count`'s text uses, as Python (for :func:`split_value`)."""
    int64, max, min = int, max, min

    @staticmethod
    def if_then_else(cond, a, b):
        return a if cond else b


def split_value(p: dict, rows: int, keys: int, n: int, m: int) -> int:
    """:func:`split_count` at ``n`` query rows and ``m`` keys (tests, plans)."""
    return int(eval(split_count(p, rows, keys), {"T": _PyT, "n": n, "m": m}))  # noqa: S307 (our text)


def merge_dims(p: dict) -> int:
    """Dims of the output a thread of the merge kernel writes (:data:`MERGE_VEC`; the tensor-core
    kernel's ``head_dim`` is a multiple of 16): its grid is ``(n * head_dim / merge_dims /
    MERGE_THREADS, heads)``."""
    assert p["head_dim"] % MERGE_VEC == 0, p["head_dim"]
    return MERGE_VEC


def _fold_splits(spl: str, vec: int, names: str, loads: tuple, store,
                 most: int = SPLIT_MAX) -> tuple[list, list, list]:
    """(allocations, loads, fold), as lines of TVMScript, that merge up to ``most`` splits'
    partials of ``vec`` output dims: every split's loads first (in flight at once), then
    ``o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s``. ``names``: the local buffers' prefix
    (``Xm``, ``Xl``, ``Xo``: each split's max, sum and accumulators; ``Xg``: the max, sum and
    output); ``loads``: split ``s``'s max and sum (expressions) and the statement loading its
    accumulators; ``store(value)``: the output's store of dim ``c``."""
    S, m, l, o, g = most, *(names + x for x in "mlog")
    load_m, load_l, load_o = loads
    lines = [f'{m} = T.alloc_buffer(({S},), "float32", scope="local")',
             f'{l} = T.alloc_buffer(({S},), "float32", scope="local")',
             f'{o} = T.alloc_buffer(({S * vec},), "float32", scope="local")',
             f'{g} = T.alloc_buffer((2 + {vec},), "float32", scope="local")']
    body = [f"for s in T.unroll({S}):",
            f"    {m}[s] = {MIN}",
            f"    {l}[s] = T.float32(0)",
            f'    if T.Cast("int64", s) < {spl}:',
            f"        {m}[s] = {load_m}",
            f"        {l}[s] = {load_l}",
            f"        {load_o}"]
    fold = [f"{g}[0] = {MIN}",
            f"for s in T.unroll({S}):",
            f"    {g}[0] = T.max({g}[0], {m}[s])",
            f"{g}[1] = T.float32(0)",
            f"for c in T.unroll({vec}):",
            f"    {g}[2 + c] = T.float32(0)",
            f"for s in T.unroll({S}):",
            f'    if T.Cast("int64", s) < {spl}:',
            f"        {m}[s] = T.exp2({m}[s] - {g}[0])",
            f"        {g}[1] = {g}[1] + {l}[s] * {m}[s]",
            f"        for c in T.unroll({vec}):",
            f"            {g}[2 + c] = {g}[2 + c] + {o}[s * {vec} + c] * {m}[s]",
            f"{g}[1] = T.float32(1) / T.max({g}[1], T.float32(1e-30))",
            f"for c in T.unroll({vec}):",
            f"    {store(f'{g}[2 + c] * {g}[1]')}"]
    return lines, body, fold


def _merge(p: dict, spl: str) -> str:
    """The second kernel of a split prefill: per (head, position, dim), the splits' partials
    merged (``o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s``, ``M`` their max); one
    workgroup doing nothing when there is one split. The head is ``blockIdx.y``, so a thread's
    position and dim are a shift and a mask of its index (``D`` is a power of two or at least a
    constant): no division by the run-time ``n``. (It was one flat index divided by ``n * D``
    and taken modulo ``n``: 64-bit divisions per thread, and the merge of a 2-split Llama-1B
    prompt of 512 tokens took 20.3 us on an H200, as long as the split kernel.)

    A thread writes ``vec`` (:func:`merge_dims`) dims, with the splits unrolled to ``SPLIT_MAX``:
    every load of a thread (each split's max, sum and ``vec`` accumulators) is issued before the
    first is used (:func:`_fold_splits`)."""
    H, D, T_, vec = p["heads"], p["head_dim"], MERGE_THREADS, merge_dims(p)
    e = f"(b * {T_} + t)"  # thread t of workgroup (b, h): position pos, dims d .. d + vec
    pos = f"({e} // {D // vec})"
    d = f"({e} % {D // vec} * {vec})"
    at = f"((s * {H} + h) * n + {pos})"  # split s's partial row
    allocs, loads, fold = _fold_splits(spl, vec, "m", (
        f"ws_m[{at}]", f"ws_l[{at}]",
        f"mo[T.Ramp(s * {vec}, 1, {vec})] = ws_o[T.Ramp({at} * {D} + {d}, 1, {vec})]"),
        lambda v: f'{out_index(p, "h", pos, f"{d} + c")} = T.Cast("float16", {v})')
    fold = loads + fold
    pad = lambda lines, n: "".join(" " * n + ln + "\n" for ln in lines)  # noqa: E731
    return f'''    for h in T.thread_binding(T.if_then_else({spl} > 1, T.int64({H}), T.int64(1)),
                              thread="blockIdx.y"):
      for b in T.thread_binding(T.if_then_else({spl} > 1, (n * {D // vec} + {T_ - 1}) // {T_},
                                               T.int64(1)), thread="blockIdx.x"):
        for t in T.thread_binding({T_}, thread="threadIdx.x"):
{pad(allocs, 12)}            if {spl} > 1 and {e} < n * {D // vec}:
{pad(fold, 16)}'''


def _merge_in_kernel(p: dict, spl: str, rows: int, threads: int, nb: str,
                     when: str | None = None, most: int = SPLIT_MAX) -> str:
    """The split kernel's own merge (:data:`MERGE_IN_KERNEL`, :data:`PROMPT_SPLITS`; statements at
    the thread level of :func:`tensor_core_kernel`, after the partials): the last split of row
    tile ``bq`` merges its ``rows`` rows, :data:`MERGE_VEC` dims a thread at a time
    (:func:`_fold_splits`, partials read from L2). ``when``: a further condition of the call
    (prompts only, where the chunks' splits have the merge kernel); ``most``: the splits there
    can be. A thread has ``rows x D / MERGE_VEC / threads`` such units (8 at head_dim 64, 32 at
    256); it loads :func:`merge_units_in_flight` of them before folding any (each unit's loads
    wait a round trip to L2)."""
    H, D, G, vec = p["heads"], p["head_dim"], p["heads"] // p["kv_heads"], merge_dims(p)
    units = -(-rows * D // vec // threads)
    U = merge_units_in_flight(most, units, D)
    last = _call("tvm_lite_split_last", f"T.Cast('uint32', kvh * {nb} + bq)",
                 f"T.Cast('uint32', {spl})", ret="int32")
    ld = lambda buf, i: _call("tvm_lite_ldcg_f32", f"T.address_of({buf}[{i}])", ret="float32")  # noqa: E731
    pad = lambda lines, n: "".join("\n" + " " * n + ln for ln in lines)  # noqa: E731
    allocs, loads, folds = [], [], []
    for u in range(U):  # unit u of round i: its own buffers (zm, zl, zo, zg, or z1m ... )
        e = f"((i * {U} + {u}) * {threads} + tx)" if U > 1 else f"(i * {threads} + tx)"
        r = _rows(p, rows, f"({e} // {D // vec})")
        d = f"({e} % {D // vec} * {vec})"
        at = f"((s * {H} + {r['head']}) * n + {r['pos']})"
        z = "z" if u == 0 else f"z{u}"
        ldv = _call("tvm_lite_ldcg_f32x4", f"T.address_of({z}o[s * {vec}])",
                    f"T.address_of(ws_o[{at} * {D} + {d}])")
        a, ld_u, fold_u = _fold_splits(
            spl, vec, z, (ld("ws_m", at), ld("ws_l", at), f"T.evaluate({ldv})"),
            lambda v, r=r, d=d: f'{out_index(p, r["head"], r["pos"], f"{d} + c")} = '
                                f'T.Cast("float16", {v})', most)
        guard = f"if {e} < {rows * D // vec} and {r['row']} < n * {G}:"
        allocs += a
        loads += [guard] + ["    " + ln for ln in ld_u]
        folds += [guard] + ["    " + ln for ln in fold_u]
    body = loads + (folds if U > 1 else folds[1:])  # (one unit: one guard)
    return f"""
                if {spl} > 1{f" and {when}" if when else ""}:
                    lst = T.alloc_buffer((1,), "int32", scope="local")
                    lst[0] = {last}
                    if lst[0] == 1:{pad(allocs, 24)}
                        for i in T.serial({-(-units // U)}):{pad(body, 28)}"""


def merge_units_in_flight(most: int, units: int, head_dim: int | None = None) -> int:
    """Units (rows x MERGE_VEC dims) a thread of the in-kernel merge loads before folding them,
    for ``most`` splits and ``units`` to merge: :data:`MERGE_IN_FLIGHT` partials at most
    (:data:`MERGE_IN_FLIGHT_SMALL_DIMS` at ``head_dim <=`` :data:`MERGE_IN_KERNEL_MAX_DIM`)."""
    small = head_dim is not None and head_dim <= MERGE_IN_KERNEL_MAX_DIM
    return max(1, min(units, (MERGE_IN_FLIGHT_SMALL_DIMS if small else MERGE_IN_FLIGHT) // most))


def tensor_core_kernel(p: dict, keys: int | None = None, shared_bytes: int = TC_SHARED_BYTES,
                       split: bool = True, static: dict | None = None,
                       m_tiles: int | None = None,
                       merge_in_kernel: bool | None = None,
                       q_registers: bool | None = None,
                       scores_ahead: bool | None = None,
                       wgmma: bool = False) -> tirx.PrimFunc:
    """``static``: ``{"n": .., "m": ..}`` (a ring kernel: ``"past"``) fixes the query and key
    counts (tests that run the generated CUDA C on the CPU: no scalar kernel arguments).
    ``m_tiles``: 16-row m-tiles a warp owns (default :data:`TC_M_TILES`); each K and V fragment
    loaded from shared memory feeds all of them. ``merge_in_kernel``: the last split of a row
    tile merges it (default :data:`MERGE_IN_KERNEL`, or head_dim <=
    :data:`MERGE_IN_KERNEL_MAX_DIM`; not for a ring kernel, whose merge kernel
    also writes the ring). ``q_registers``: Q's fragments loaded once, before the key loop
    (default :data:`TC_Q_REGISTERS`, only up to :data:`TC_Q_REGISTERS_MAX_DIM`).
    ``scores_ahead``: tile kb + 1's Q Kᵀ before tile kb's softmax (default
    :data:`TC_SCORES_AHEAD`). ``wgmma``: both products by Hopper's ``wgmma`` (sm_90a only: the
    caller checks the target; :data:`TC_WGMMA`), one m-tile a warp; with ``scores_ahead`` the
    Q Kᵀ products of tile kb + 1 stay in flight on the tensor cores while tile kb's softmax runs."""
    decl, _ = signature(p)
    H, KV, D = p["heads"], p["kv_heads"], p["head_dim"]
    G, f32 = H // KV, "T.float32"
    MT = m_tiles_for(p, m_tiles)
    ahead = TC_SCORES_AHEAD if scores_ahead is None else scores_ahead
    if wgmma and (MT != 1 or TC_WARPS % 4):
        raise ValueError(f"wgmma: warpgroups of 64 rows (m_tiles={MT}, {TC_WARPS} warps)")
    rows, fit = tensor_core_tiles(p, shared_bytes, MT, 4 if ahead else 2)
    keys = keys or fit
    threads = 32 * TC_WARPS
    DP = D + 8
    NT, KT, DT, KP = keys // 8, D // 16, D // 8, keys // 16  # score n-tiles, Q k-steps, output n-tiles, P k-steps
    warp, lane = "(tx // 32)", "(tx % 32)"
    g, t4 = f"({lane} // 4)", f"({lane} % 4)"

    def row(c: str) -> dict:  # tile row of accumulator element c of m-tile mt (0, 1: row g; 2, 3: g + 8)
        return _rows(p, rows, f"{warp} * {16 * MT} + mt * 16 + {g} + ({c}) // 2 * 8")

    # one shared buffer for the three tiles (separate ones would be merged by liveness, and
    # TVM does not see the ldmatrix reads through their addresses)
    # shared memory (fp16 elements): Q, then one K and one V tile (two each when ahead), rows
    # padded by 16 bytes, or with wgmma as core matrices (QL, KL: bytes between column groups)
    q_elems, tile = rows * DP, keys * DP
    layout_q = layout_kv = None
    if wgmma:
        QL, KL = core_matrix_stride(rows), core_matrix_stride(keys)
        q_elems, tile = D // 8 * QL // 2, D // 8 * KL // 2
        layout_q, layout_kv = core_matrix_index(rows), core_matrix_index(keys)
    buffers = 2 if ahead else 1
    KO = q_elems
    VO = KO + buffers * tile
    smem = VO + buffers * tile

    def buf(base: int, kb: str) -> str:  # the K or V buffer of tile kb (two each when ahead)
        return f"{base} + ({kb}) % 2 * {tile}" if ahead else str(base)

    if merge_in_kernel is None:
        merge_in_kernel = MERGE_IN_KERNEL or D <= MERGE_IN_KERNEL_MAX_DIM
    merge_in_kernel = merge_in_kernel and split and not p.get("window")
    # a prompt's splits merged in the kernel, a chunk's by the merge kernel (PROMPT_SPLITS)
    prompt_split = split and PROMPT_SPLITS > 1 and not p.get("window") and not merge_in_kernel
    # With the in-kernel merge Q comes by cp.async (waited with the first K tile). Its 16-byte
    # loads failed CUDA codegen there: with the split kernel its function's only kernel, TVM's
    # CSE moved the row tile's part of their address to the host, their alignment was no longer
    # provable, and the per-lane fallback needs an int64x8 index vector, which CUDA lacks.
    q_load = _q_load(p, rows, "float16", D, 8, 8, threads, ("sm", ""),
                     async_copy=merge_in_kernel, layout=layout_q)

    def k_load(kb: str, indent: int) -> str:  # cp.async: in flight until the next wait
        return _kv_load(p, keys, "float16", D, 8, 8, threads, (("sm", f" + ({buf(KO, kb)})"
                                                                if ahead else f" + {KO}"),),
                        "k", kb, indent, async_copy=True, layout=layout_kv)

    def v_load(kb: str = "kb", indent: int = 20) -> str:
        return _kv_load(p, keys, "float16", D, 8, 8, threads, (("sm", f" + ({buf(VO, kb)})"
                                                                if ahead else f" + {VO}"),),
                        "v", kb, indent, async_copy=True, layout=layout_kv)
    wait = f"T.evaluate({_call('tvm_lite_cp_async_wait_all')})"
    if wgmma:  # the copies (and Q's stores) made visible to the tensor cores' async proxy
        wait += f"\n{' ' * 20}T.evaluate({_call('tvm_lite_fence_async_shared')})"
    # per m-tile mt: s[mt * NT * 4 ..] (and mk), oa[mt * DT * 4 ..], af[mt * 4 ..],
    # pf[mt * KP * 4 ..], st[mt * 6 ..] (max x2, sum x2, tmp x2)
    S, O, ST = f"mt * {NT * 4} + ", f"mt * {DT * 4} + ", "mt * 6 + "
    if q_registers is None:
        q_registers = TC_Q_REGISTERS
    q_registers = q_registers and D <= TC_Q_REGISTERS_MAX_DIM and not wgmma
    # Q's A fragment of m-tile mt at k-step kk: loaded in the key loop, or once into qf
    AF = [f"qf[(mt * {KT} + kk) * 4 + {i}]" if q_registers else f"af[mt * 4 + {i}]"
          for i in range(4)]
    PF = [f"pf[mt * {KP * 4} + kp * 4 + {i}]" for i in range(4)]
    rc, rh = row("c"), row("hr * 2")
    masked = not p.get("window")  # a ring kernel masks by position: no mask tensor
    clean = masked and TC_MASK_CLEAN_TILES and not p["mask_heads"] and G >= 2
    prefetch = masked and TC_MASK_PREFETCH and not clean and not (
        D <= TC_MASK_PREFETCH_SKIP_DIM and G >= TC_MASK_PREFETCH_SKIP_GROUP)
    # Index registers, set once (the per-score work is what bounds the kernel at small head_dim):
    # ib = [m, the first key of this thread's columns in the tile] as int32; mo = the flat mask
    # offset of each accumulator row (its head and position; rows past n * G read row n - 1:
    # their scores are never written out). A score's mask element is then a load at a constant
    # offset from one per-row, per-tile address.
    key = f"(ib[1] + nt * 8 + c % 2)"  # int32
    key64 = f"T.Cast('int64', {key})"
    mh = H if p.get("mask_heads") else 1
    mq = "n" if p.get("mask_rows") else "1"
    index_init = """
                ib[0] = T.Cast("int32", m)"""
    if masked:
        head = rh["head"] if p["mask_heads"] else "T.int64(0)"
        pos = f"T.min({rh['pos']}, n - 1)" if p["mask_rows"] else "T.int64(0)"
        index_init += f"""
                for mt in T.unroll({MT}):
                    for hr in T.unroll(2):
                        mo[mt * 2 + hr] = ({head} * {mq} + {pos}) * m"""
    mask_flat = f'    mflat = T.decl_buffer(({mh} * {mq} * m,), "{p["mask_dtype"]}", data=mask.data)\n' \
        if masked else ""
    # mr: this tile's mask address of each accumulator row, kept in registers so that a score's
    # element is one load at an immediate offset from it
    mask_at = "mflat[mr[mt * 2 + c // 2] + (nt * 8 + c % 2)]"
    row_base = f"""
                    for mt in T.unroll({MT}):
                        for hr in T.unroll(2):
                            mr[mt * 2 + hr] = mo[mt * 2 + hr] + T.Cast("int64", ib[1])""" \
        if masked else ""
    # the tile's mask elements, read into registers before its products (their latency hides
    # behind the MMAs); in the last tile the keys are clamped into the mask (no guard needed)
    pre = f"""for mt in T.unroll({MT}):
                            for nt in T.unroll({NT}):
                                for c in T.unroll(4):
                                    mk[{S}nt * 4 + c] = T.Cast("float32", %s)"""
    mask_pre = f"""
                    if (kb + 1) * {keys} <= m:
                        {pre % mask_at}
                    else:
                        {pre % f"mflat[mo[mt * 2 + c // 2] + T.Cast('int64', T.min({key}, ib[0] - 1))]"}""" \
        if prefetch else ""
    mk_alloc = f"""
                mk = T.alloc_buffer(({MT * NT * 4},), "float32", scope="local")""" if prefetch else ""
    if clean:  # the warp's distinct mask rows (its positions) x the tile's keys, lanes on keys
        w0 = f"(bq * {rows} + {warp} * {16 * MT})"  # the warp's first row
        npos = (16 * MT + G - 2) // G + 1 if p["mask_rows"] else 1
        count = npos * keys
        e = f"(i * 32 + {lane})"
        at = (f"T.min({w0} // {G} + {e} // {keys}, T.min(({w0} + {16 * MT - 1}) // {G}, n - 1)) * m"
              if p["mask_rows"] else "T.int64(0)")

        def clean_check(kb: str, indent: int) -> str:
            """cd[0] = whether a lane's elements of key tile ``kb`` hold a non-zero: read while
            the tile before is multiplied by V (the registers of its scores are free there)."""
            el = f"mflat[{at} + ({kb}) * {keys} + T.Cast('int64', {e} % {keys})]"
            # (lanes past the count read the warp's last position again: no guard)
            lines = [f"if ({kb} + 1) * {keys} <= m:", "    cd[0] = 0",
                     f"    for i in T.unroll({-(-count // 32)}):",
                     f"        cd[0] = cd[0] | T.if_then_else({el} != T.{p['mask_dtype']}(0), 1, 0)"]
            return "\n" + "\n".join(" " * indent + ln for ln in lines)
        mk_alloc += """
                cd = T.alloc_buffer((1,), "int32", scope="local")"""
    mk_alloc += """
                ib = T.alloc_buffer((2,), "int32", scope="local")""" + (f"""
                mo = T.alloc_buffer(({2 * MT},), "int64", scope="local")
                mr = T.alloc_buffer(({2 * MT},), "int64", scope="local")""" if masked else "")
    mask = f"mk[{S}nt * 4 + c]" if prefetch else (mask_at if masked else "0")
    # A row's max and sum over the tile's scores as balanced trees (depth log2(2 NT), not a
    # chain of 2 NT dependent operations each)
    row_scores = [f"s[{S}{nt * 4 + c} + hr * 2]" for nt in range(NT) for c in range(2)]

    def tree(op: str, items: list) -> str:
        while len(items) > 1:
            items = [op.format(*items[i:i + 2]) if i + 1 < len(items) else items[i]
                     for i in range(0, len(items), 2)]
        return items[0]

    # Scores stay in the units of the raw dot product (FlashAttention-2's softmax): the mask is
    # divided by the scale on the way in (one FFMA a score), the row max is taken on them, and
    # the scale and log2 e meet in the FFMA that feeds exp2 (x * C - max * C). A soft-capped
    # kernel (tanh) cannot defer its scale: its scores are in log2 units already (C = 1).
    fold = not p.get("softcap")
    C = p["scale"] * LOG2E if fold else 1.0

    def to_log2(x: str) -> str:
        return x if C == 1.0 else f"({x}) * {f32}({C!r})"

    def x_score(mask_el: str | None) -> str:  # one score in the kernel's units (None: no mask)
        raw = f"s[{S}nt * 4 + c]"
        if not fold:
            return f"({score(p, raw, mask_el or '0')}) * {f32}({LOG2E!r})"
        return f"{raw} + {mask_el} * {f32}({1.0 / p['scale']!r})" if masked and mask_el else raw

    # Keys past m (the last tile's tail) and a ring's invisible keys score NEG (finite, so that
    # NEG * C and NEG - NEG stay finite: a row with nothing visible yet weighs e^0 until its
    # first visible key rescales it to 0). Full tiles of a masked kernel need no test at all.
    def score_loop(guarded: bool, indent: int, mask_el: str | None = mask) -> str:
        x = x_score(mask_el)
        if guarded:
            x = (f"T.if_then_else({key} < ib[0] and {ring_visible(p, rc['pos'], key64)}, "
                 f"{x}, {NEG})")
        lines = [f"for mt in T.unroll({MT}):",
                 f"    for nt in T.unroll({NT}):",
                 "        for c in T.unroll(4):",
                 f"            s[{S}nt * 4 + c] = {x}"]
        return "\n".join(" " * indent + ln for ln in lines)

    if clean:  # a whole tile: the warp's vote; a clean one adds no mask
        scores = f"""                    if (kb + 1) * {keys} <= m:
                        if {_call("tvm_lite_warp_none", "cd[0]", ret="int32")} == 1:
{score_loop(False, 28, None)}
                        else:
{score_loop(False, 28)}
                    else:
{score_loop(True, 24)}"""
    elif masked:
        scores = f"""                    if (kb + 1) * {keys} <= m:
{score_loop(False, 24)}
                    else:
{score_loop(True, 24)}"""
    else:
        scores = score_loop(True, 20)
    def at_base(base: str, r: str, c: str) -> str:  # address of row r, column c of a tile at base
        return f"T.address_of(sm[{base} + ({r}) * {DP} + {c}])"

    def q_fragment(kk: str) -> str:  # ldmatrix of Q's A fragment (m-tile mt, k-step kk)
        return _call("tvm_lite_ldsm_x4", at_base("0", f"{warp} * {16 * MT} + mt * 16 + {lane} % 16",
                                                 f"{kk} * 16 + {lane} // 16 * 8"), ret="uint32x4")

    if q_registers:  # after the Q tile (and the first K tile) landed: every fragment, once
        q_frags, q_in_loop = f"""
                qf = T.alloc_buffer(({MT * KT * 4},), "uint32", scope="local")
                {wait}
                T.tvm_storage_sync("shared")
                for mt in T.unroll({MT}):
                    for kq in T.unroll({KT}):
                        qf[T.Ramp((mt * {KT} + kq) * 4, 1, 4)] = {q_fragment("kq")}""", ""
    else:
        q_frags, q_in_loop = "", f"""
                        for mt in T.unroll({MT}):
                            af[T.Ramp(mt * 4, 1, 4)] = {q_fragment("kk")}"""
    nb = f"((n * {G} + {rows - 1}) // {rows})"  # row tiles
    spl = split_count(p, rows, keys) if split else "T.int64(1)"
    tiles = _key_tiles(p, rows, keys)
    first = _first_key_tile(p, rows, keys)
    causal, decided = _causal_check(p, rows, threads, lambda h, i, j: (
        f"mflat[({h if p['mask_heads'] else 0} * {mq} + {i if p['mask_rows'] else 0}) * m + {j}]"))
    per = f"(({tiles} - {first} + {spl} - 1) // {spl})"  # key tiles of one split
    # This split's key tiles [kr[0], kr[1]), computed once: inline, the bounds (a data-dependent
    # causal bound and 64-bit divisions by the split count) were evaluated again in the loop
    bounds = f"""
                kr = T.alloc_buffer((2,), "int64", scope="local")
                kr[0] = {first} + sp * {per}
                kr[1] = T.min({tiles}, {first} + (sp + 1) * {per})"""
    lo, hi = "kr[0]", "kr[1]"
    ws = f"T.if_then_else({spl} > 1, {spl} * {H} * n, T.int64(1))"  # partial rows (1: unused)
    part = f"((sp * {H} + {rh['head']}) * n + {rh['pos']})"
    at_o = f"{part} * {D} + dt * 8 + {t4} * 2"  # a thread's two neighbouring dims
    partial_store = (" " * 32 + f"ws_o[T.Ramp({at_o}, 1, 2)] = oa[T.Ramp({O}dt * 4 + hr * 2, 1, 2)]"
                     if TC_PAIR_PARTIALS else
                     " " * 32 + "for c in T.unroll(2):\n" + " " * 36
                     + f"ws_o[{at_o} + c] = oa[{O}dt * 4 + hr * 2 + c]")
    partial = f"""
                        if {rh["row"]} < n * {G} and {spl} > 1:  # the split's partial: max, sum, acc
                            if {t4} == 0:
                                ws_m[{part}] = {to_log2(f"st[{ST}hr]")}
                                ws_l[{part}] = st[{ST}hr + 2]
                            for dt in T.unroll({DT}):
{partial_store}"""
    workspace = f"""    ws_m = T.alloc_buffer(({ws},), "float32", scope="global")
    ws_l = T.alloc_buffer(({ws},), "float32", scope="global")
    ws_o = T.alloc_buffer(({ws} * {D},), "float32", scope="global")
"""
    if not split:
        partial = workspace = ""
    def products(ldsm: str, address: str, acc: str, a: list) -> str:
        """Load a B fragment pair into ``bf`` (``ldsm`` from ``address``), then for each m-tile
        two ``mma.sync`` into ``acc`` and ``acc + 4`` (statements at the innermost loop's level)."""
        return f"""                            bf[T.Ramp(0, 1, 4)] = {_call(ldsm, address, ret="uint32x4")}
                            for mt in T.unroll({MT}):
                                T.evaluate({_call("tvm_lite_mma16816", f"T.address_of({acc}])",
                                                  *a, "bf[0]", "bf[1]")})
                                T.evaluate({_call("tvm_lite_mma16816", f"T.address_of({acc} + 4])",
                                                  *a, "bf[2]", "bf[3]")})
"""

    def ev(name: str, *args) -> str:
        return f"T.evaluate({_call(name, *args)})"

    def qk(dst: str, k_base: str, wait: bool = True) -> str:
        """``dst`` = Q Kᵀ of the K tile at ``k_base`` (statements at the key loop's level). With
        wgmma and ``wait`` False the products are left in flight (a later wait ends them)."""
        if wgmma:  # k-step kk: column groups 2 kk, 2 kk + 1 of Q and K; a warpgroup's 64 rows
            # are 8 row groups of Q (512 elements)
            return f"""                    for i in T.unroll({NT * 4}):
                        {dst}[i] = {f32}(0)
                    {ev("tvm_lite_wgmma_fence")}
                    for kk in T.unroll({KT}):
                        {ev(f"tvm_lite_wgmma_ss_m64n{keys}k16", f"T.address_of({dst}[0])",
                            f"T.address_of(sm[{warp} // 4 * 512 + kk * {QL}])",
                            f"T.address_of(sm[{k_base} + kk * {KL}])",
                            f"T.uint32({QL})", f"T.uint32({KL})")}
                    {ev("tvm_lite_wgmma_commit")}
""" + (f"""                    {ev("tvm_lite_wgmma_wait0")}
""" if wait else "")
        return f"""                    for i in T.unroll({MT * NT * 4}):
                        {dst}[i] = {f32}(0)
                    for kk in T.unroll({KT}):{q_in_loop}
                        for np in T.unroll({NT // 2}):
""" + products("tvm_lite_ldsm_x4", at_base(k_base, f"np * 16 + {lane} // 16 * 8 + {lane} % 8",
                                           f"kk * 16 + {lane} // 8 % 2 * 8"),
               f"{dst}[{S}np * 8", AF)

    def pv(v_base: str) -> str:
        """O += P V of the V tile at ``v_base``."""
        if wgmma:  # k-step kp: key groups 2 kp, 2 kp + 1 of V (128 bytes each), MN-major
            return f"""                    {ev("tvm_lite_wgmma_fence")}
                    for kp in T.unroll({KP}):
                        {ev(f"tvm_lite_wgmma_rs_m64n{D}k16_tb", "T.address_of(oa[0])",
                            *[f"pf[kp * 4 + {i}]" for i in range(4)],
                            f"T.address_of(sm[{v_base} + kp * 128])", "T.uint32(128)", f"T.uint32({KL})")}
                    {ev("tvm_lite_wgmma_commit")}
                    {ev("tvm_lite_wgmma_wait0")}
"""
        return f"""                    for kp in T.unroll({KP}):
                        for dp in T.unroll({D // 16}):
""" + products("tvm_lite_ldsm_x4_trans",
               at_base(v_base, f"kp * 16 + {lane} // 8 % 2 * 8 + {lane} % 8",
                       f"dp * 16 + {lane} // 16 * 8"), f"oa[{O}dp * 8", PF)

    def deeper(text: str) -> str:  # statements one level deeper (under an if)
        return "\n".join("    " + ln if ln else ln for ln in text.split("\n"))

    softmax = f"""                    for mt in T.unroll({MT}):
                        for hr in T.unroll(2):
                            st[{ST}4] = T.max(st[{ST}hr], {tree("T.max({}, {})", row_scores)})
                            st[{ST}4] = {_call("tvm_lite_quad_max", f"st[{ST}4]", ret="float32")}
                            st[{ST}5] = {_call("tvm_lite_ex2", to_log2(f"st[{ST}hr] - st[{ST}4]"), ret="float32")}
                            st[{ST}hr] = st[{ST}4]
                            st[{ST}4] = {to_log2(f"st[{ST}4]")}
                            st[{ST}hr + 2] = st[{ST}hr + 2] * st[{ST}5]
                            for dt in T.unroll({DT}):
                                oa[{O}dt * 4 + hr * 2] = oa[{O}dt * 4 + hr * 2] * st[{ST}5]
                                oa[{O}dt * 4 + hr * 2 + 1] = oa[{O}dt * 4 + hr * 2 + 1] * st[{ST}5]
                            for nt in T.unroll({NT}):
                                for c in T.unroll(2):
                                    s[{S}nt * 4 + hr * 2 + c] = {_call(
                                        "tvm_lite_ex2", to_log2(f"s[{S}nt * 4 + hr * 2 + c]") + f" - st[{ST}4]", ret="float32")}
                            st[{ST}hr + 2] = st[{ST}hr + 2] + {tree("({} + {})", row_scores)}
                        for kp in T.unroll({KP}):
                            for r in T.unroll(4):
                                pf[mt * {KP * 4} + kp * 4 + r] = {_call(
                                    "tvm_lite_pack_half2",
                                    f"s[{S}(kp * 2 + r // 2) * 4 + r % 2 * 2]",
                                    f"s[{S}(kp * 2 + r // 2) * 4 + r % 2 * 2 + 1]", ret="uint32")}
"""
    if not ahead:
        # Software pipeline (FlashAttention-2's): K of tile kb+1 is copied while P V of tile kb
        # runs, V of tile kb while Q Kᵀ and the softmax of tile kb run. One K and one V buffer
        # suffice: each copy starts after the barrier that ends the reads of the tile it
        # overwrites.
        prologue = f"""                if {lo} < {hi}:
{k_load(lo, 20)}{clean_check(lo, 20) if clean else ""}{q_frags}"""
        loop = (f"""                for kb in range({lo}, {hi}):
                    {wait}
                    T.tvm_storage_sync("shared")
                    ib[1] = T.Cast("int32", kb * {keys}) + {t4} * 2{row_base}
{v_load()}{mask_pre}
""" + qk("s", str(KO)) + f"""{scores}
""" + softmax + f"""                    {wait}
                    T.tvm_storage_sync("shared")
                    if kb + 1 < {hi}:
{k_load("kb + 1", 24)}{clean_check("kb + 1", 24) if clean else ""}
""" + pv(str(VO)))
    else:
        # Scores a tile ahead: iteration kb waits for K of tile kb + 1 and V of tile kb (both
        # copied during iteration kb - 1), issues the copies of K of tile kb + 2 and V of tile
        # kb + 1 into the buffers that tiles kb and kb - 1 left (their reads ended before the
        # barrier), the Q Kᵀ products of tile kb + 1 into s2, then the softmax and P V of
        # tile kb (its scores in s, from the iteration before).
        prologue = f"""                if {lo} < {hi}:
{k_load(lo, 20)}{clean_check(lo, 20) if clean else ""}
{v_load(lo, 20)}
                if {lo} + 1 < {hi}:
{k_load(f"{lo} + 1", 20)}{q_frags}"""
        wait16 = wait.replace("\n" + " " * 20, "\n" + " " * 16)  # (at the loop's level)
        loop = (f"""                {wait16}
                T.tvm_storage_sync("shared")
                if {lo} < {hi}:
{deeper(qk("s", buf(KO, lo)))}
                for kb in range({lo}, {hi}):
                    {wait}
                    T.tvm_storage_sync("shared")
                    ib[1] = T.Cast("int32", kb * {keys}) + {t4} * 2{row_base}
                    if kb + 2 < {hi}:
{k_load("kb + 2", 24)}
                    if kb + 1 < {hi}:
{v_load("kb + 1", 24)}{mask_pre}
                    if kb + 1 < {hi}:
{deeper(qk("s2", buf(KO, "kb + 1"), wait=False))}
{scores}
""" + softmax + (f"""                    if kb + 1 < {hi}:{clean_check("kb + 1", 24)}
""" if clean else "") + pv(buf(VO, "kb")) + f"""                    for i in T.unroll({MT * NT * 4}):
                        s[i] = s2[i]
""")
        mk_alloc += f"""
                s2 = T.alloc_buffer(({MT * NT * 4},), "float32", scope="local")"""
    o_at = lambda d: out_index(p, rh["head"], rh["pos"], d)  # noqa: E731
    o_val = lambda c: f"oa[{O}dt * 4 + hr * 2 + {c}] * st[{ST}4]"  # noqa: E731
    staged = TC_STAGED_STORES and not wgmma
    wrow = f"{warp} * {16 * MT}"  # the warp's first row of the tile
    staged_back = ""
    if staged:  # the warp's rows of Q's tile (fp16, DP a row), then 16 bytes a thread
        VR = D // 8  # 16-byte vectors a row
        per_warp = 16 * MT * VR
        e = f"(i * 32 + {lane})"
        rv = _rows(p, rows, f"{wrow} + {e} // {VR}")
        back = _call("tvm_lite_lds_v4", f"T.address_of(sm[({wrow} + {e} // {VR}) * {DP} + "
                     f"{e} % {VR} * 8])", ret="uint32x4")
        store = _call("tvm_lite_st_v4", "T.address_of(" + out_index(
            p, rv["head"], rv["pos"], f"{e} % {VR} * 8") + ")", back)
        guard = f"{e} < {per_warp} and " if per_warp % 32 else ""
        staged_back = f"""
                if {spl} == 1:
                    T.evaluate({_call("tvm_lite_syncwarp")})
                    for i in T.unroll({-(-per_warp // 32)}):
                        if {guard}{rv["row"]} < n * {G}:
                            T.evaluate({store})"""
        out_store = " " * 32 + "T.evaluate(" + _call(
            "tvm_lite_st_f16x2", f"T.address_of(sm[({wrow} + mt * 16 + {g} + hr * 8) * {DP} + "
            f"dt * 8 + {t4} * 2])", o_val(0), o_val(1)) + ")"
    elif TC_PAIR_STORES:  # dims 2 t4, 2 t4 + 1 in one 4-byte store
        out_store = " " * 32 + "T.evaluate(" + _call(
            "tvm_lite_st_f16x2", f"T.address_of({o_at(f'dt * 8 + {t4} * 2')})", o_val(0),
            o_val(1)) + ")"
    else:
        out_store = (" " * 32 + "for c in T.unroll(2):\n" + " " * 36
                     + f'{o_at(f"dt * 8 + {t4} * 2 + c")} = T.Cast("float16", {o_val("c")})')
    kv_tag, bq_tag = grid_tags()
    src = kernel_source(p, decl, f"""{workspace}{mask_flat}    for kvh in T.thread_binding({KV}, thread="{kv_tag}"):
      for sp in T.thread_binding({spl}, thread="blockIdx.z"):
        for bqr in T.thread_binding({nb}, thread="{bq_tag}"):
            for tx in T.thread_binding({threads}, thread="threadIdx.x"):
                sm = T.alloc_buffer(({smem},), "float16", scope="shared.dyn")
                oa = T.alloc_buffer(({MT * DT * 4},), "float32", scope="local")
                s = T.alloc_buffer(({MT * NT * 4},), "float32", scope="local")
                pf = T.alloc_buffer(({MT * KP * 4},), "uint32", scope="local")
                af = T.alloc_buffer(({MT * 4},), "uint32", scope="local")
                bf = T.alloc_buffer((4,), "uint32", scope="local")
                st = T.alloc_buffer(({MT * 6},), "float32", scope="local"){mk_alloc}{causal}
{q_load}{decided}{bounds}
{prologue}
                for i in T.unroll({MT * DT * 4}):
                    oa[i] = {f32}(0)
                for mt in T.unroll({MT}):
                    st[{ST}0] = {NEG}
                    st[{ST}1] = {NEG}
                    st[{ST}2] = {f32}(0)
                    st[{ST}3] = {f32}(0){index_init}
{loop}                for mt in T.unroll({MT}):
                    for hr in T.unroll(2):
                        st[{ST}hr + 2] = T.max({_call("tvm_lite_quad_sum", f"st[{ST}hr + 2]", ret="float32")},
                                               T.float32(1e-30))
                        st[{ST}4] = T.float32(1) / st[{ST}hr + 2]  # one division a row, not one a value
                        if {rh["row"] + " < n * " + str(G) + " and " if not staged else ""}{spl} == 1:
                            for dt in T.unroll({DT}):
{out_store}{partial}{staged_back}{
        _merge_in_kernel(p, spl, rows, threads, nb) if merge_in_kernel else ""}{
        _merge_in_kernel(p, spl, rows, threads, nb, "m < 2 * n", PROMPT_SPLITS)
        if prompt_split else ""}
{_merge(p, f"T.if_then_else(m >= 2 * n, {spl}, T.int64(1))" if prompt_split else spl)
 if split and not merge_in_kernel else ""}{ring_write(p) if p.get("window") else ""}""", static)
    src = re.sub(r"\bbq\b", f"({nb} - 1 - bqr)", src)  # the longest row tiles (last rows) first
    return parse(src, static, HELPERS=HELPERS)


def prefill_kernel(p: dict, profile: str, target, threads: int, local_bytes: int,
                   vector_bytes: int, static: dict | None = None) -> tirx.PrimFunc:
    """The prefill kernel for ``profile`` on ``target`` (see the module doc)."""
    max_threads = int(target.attrs.get("max_num_threads", threads))
    if profile == "cuda" and tensor_core_applies(p, target):
        wgmma = (TC_WGMMA and wgmma_supported(target) and m_tiles_for(p) == 1
                 and TC_WARPS % 4 == 0)
        return tensor_core_kernel(p, static=static, wgmma=wgmma)
    return simt_kernel(p, min(threads, max_threads), local_bytes, vector_bytes, static)


__all__ = ["prefill_kernel", "simt_kernel", "tensor_core_kernel", "simt_tiles",
           "tensor_core_tiles", "m_tiles_for", "tensor_core_applies", "split_count", "split_value",
           "merge_dims", "grid", "grid_tags",
           "HELPERS"]
