"""Run the generated CUDA C of tvm_lite's tensor-core kernels (prefill GEMM and attention) on the CPU.

No GPU is needed. The kernel source TVM generates for ``cuda`` is compiled with g++ after a shim
(as in :mod:`cuda_on_cpu`): each thread of a workgroup is a ``std::thread``, ``__syncthreads()``
a ``std::barrier``, ``half`` is ``_Float16``. A workgroup's state (its dynamic and static shared
memory, its barriers, the arrays its warps exchange operands through) is a ``Block`` on the heap
that each of its threads reaches through ``blk``. Workgroups run one after another -- or, for a
kernel declared with ``__cluster_dims__``, Hopper's thread-block clusters one after another, the
blocks of a cluster at once: ``tvm_lite_cluster_sync`` is a barrier over all their threads and
``tvm_lite_ld_dsmem_f32x4`` reads the dynamic shared memory of the block of a rank (distributed
shared memory). The warp-wide PTX helpers are replaced by C++ with the PTX ISA's fragment
layouts (``ldmatrix`` x4 and .trans, ``mma.sync.m16n8k16``, the quad shuffles, ``cp.async``
copies that land at the thread's next wait): each lane publishes its operands to its warp, the
warp meets at a barrier, and each lane computes what the hardware would hand it -- so the
kernel's own addressing, staging, dequant, fragment-to-output mapping, split-K and epilogue run
as generated; only the products' summation order differs.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

SHIM = r'''
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <thread>
#include <barrier>
#include <condition_variable>
#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <vector>
struct d3 { int x, y, z; };
thread_local d3 threadIdx, blockIdx;
thread_local int lane_id, warp_id;
// named barriers (bar.sync / bar.arrive id, count): a phase completes when count threads have
// arrived; sync waits for its phase, arrive does not
struct NamedBar { std::mutex m; std::condition_variable cv; int arrived = 0; long gen = 0; };
struct Cluster;
struct alignas(64) Chunk { unsigned char b[64]; };
// A workgroup's state, fresh for each workgroup: its shared memory, its barriers (__syncthreads,
// one per warp for the warp-wide helpers, the named ones) and the arrays through which a warp's
// lanes exchange operands ([warp_id][lane_id]). On the heap: a cluster's blocks live at once.
struct Block {
  alignas(64) unsigned char dyn_shared[256 * 1024] = {};  // extern __shared__ (made a pointer)
  std::mutex static_m;
  std::map<int, std::unique_ptr<Chunk[]>> static_vars;  // the kernel's own __shared__ arrays
  std::barrier<> bar;  // __syncthreads
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  NamedBar named_bars[16];
  const void* xp[32][32];  // ldmatrix: the lanes' row addresses
  unsigned xr[32][32][6];  // mma.sync: the lanes' A and B words
  unsigned xa[32][32][4];  // wgmma with A from registers: the lanes' A words
  float xf[32][32];        // the quad shuffles
  int xi[32][32];          // __all_sync
  int split_last_flag = 0;
  Cluster* cluster;        // its cluster (of this one block where the kernel declares none)
  int rank;                // in the cluster: x + y cx + z cx cy of its place there
  std::atomic<int> running;  // its threads not yet returned from the kernel
  Block(int th, Cluster* c, int r) : bar(th), cluster(c), rank(r), running(th) {
    for (int w = 0; w < (th + 31) / 32; ++w)
      warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  }
};
// A thread-block cluster: its blocks by rank and a barrier over all their threads (a thread that
// returns from the kernel drops out of it: barrier.cluster waits for the non-exited threads)
struct Cluster {
  std::vector<Block*> blocks;
  std::barrier<> bar;
  explicit Cluster(int threads) : bar(threads) {}
};
thread_local Block* blk;  // the calling thread's workgroup
// a static __shared__ array of the kernel, one per workgroup (_kernels numbers the declarations)
template <class T> static T& block_static(int id) {
  std::lock_guard<std::mutex> l(blk->static_m);
  auto& p = blk->static_vars[id];
  if (!p) p.reset(new Chunk[(sizeof(T) + 63) / 64]());
  return *(T*)p.get();
}
#define __syncthreads() blk->bar.arrive_and_wait()
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __cluster_dims__(x, y, z)
#define __restrict__ __restrict
typedef _Float16 half;
typedef unsigned int uint;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
#define CUDART_INF_F INFINITY
struct alignas(8) half4 { half x, y, z, w; };
struct alignas(4) half2 { half x, y; };
static inline half4 make_half4(half a, half b, half c, half d) { return {a, b, c, d}; }
static inline half2 make_half2(half a, half b) { return {a, b}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline float2 make_float2(float a, float b) { return {a, b}; }
static inline half __float2half_rn(float f) { return (half)f; }
static inline unsigned short bits(half h) { unsigned short b; memcpy(&b, &h, 2); return b; }
static inline half from_bits(unsigned short b) { half h; memcpy(&h, &b, 2); return h; }
static inline unsigned __pack_half2(half x, half y) { return bits(x) | ((unsigned)bits(y) << 16); }
static inline half hexp(half v) { return (half)expf((float)v); }
template <class A, class B> static inline auto max(A a, B b) { return a > b ? a : b; }
template <class A, class B> static inline auto min(A a, B b) { return a < b ? a : b; }
static inline void warp_sync() { blk->warp_bar[warp_id]->arrive_and_wait(); }
static unsigned pair(const void* row, int col) {  // two fp16 of a row, col and col + 1
  const unsigned short* r = (const unsigned short*)row;
  return r[col] | ((unsigned)r[col + 1] << 16);
}
static uint4 tvm_lite_ldsm_x4(const void* p) {  // lane l: row l/4, cols 2(l%4).. of each 8x8
  blk->xp[warp_id][lane_id] = p; warp_sync();
  unsigned r[4];
  for (int j = 0; j < 4; ++j) r[j] = pair(blk->xp[warp_id][8 * j + lane_id / 4], lane_id % 4 * 2);
  warp_sync();
  return {r[0], r[1], r[2], r[3]};
}
static uint4 tvm_lite_ldsm_x4_trans(const void* p) {  // the transposed 8x8 tiles
  blk->xp[warp_id][lane_id] = p; warp_sync();
  unsigned r[4];
  for (int j = 0; j < 4; ++j) {
    const unsigned short* a = (const unsigned short*)blk->xp[warp_id][8 * j + lane_id % 4 * 2];
    const unsigned short* b = (const unsigned short*)blk->xp[warp_id][8 * j + lane_id % 4 * 2 + 1];
    r[j] = a[lane_id / 4] | ((unsigned)b[lane_id / 4] << 16);
  }
  warp_sync();
  return {r[0], r[1], r[2], r[3]};
}
static float lo(unsigned v) { return (float)from_bits(v & 0xFFFF); }
static float hi(unsigned v) { return (float)from_bits(v >> 16); }
static void tvm_lite_mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                              unsigned b0, unsigned b1) {
  unsigned* mine = blk->xr[warp_id][lane_id];
  mine[0] = a0; mine[1] = a1; mine[2] = a2; mine[3] = a3; mine[4] = b0; mine[5] = b1;
  warp_sync();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    unsigned* o = blk->xr[warp_id][L];
    int g = L / 4, t = L % 4 * 2;
    for (int i = 0; i < 4; ++i) {  // a0: (g, t), a1: (g + 8, t), a2: (g, t + 8), a3: (g + 8, t + 8)
      int r = g + (i % 2) * 8, k = t + (i / 2) * 8;
      A[r][k] = lo(o[i]); A[r][k + 1] = hi(o[i]);
    }
    B[t][g] = lo(o[4]); B[t + 1][g] = hi(o[4]); B[t + 8][g] = lo(o[5]); B[t + 9][g] = hi(o[5]);
  }
  warp_sync();
  int g = lane_id / 4, t = lane_id % 4 * 2;
  for (int e = 0; e < 4; ++e) {
    int r = g + (e / 2) * 8, n = t + e % 2;
    float s = 0;
    for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][n];
    c[e] += s;
  }
}
static unsigned tvm_lite_dq_half2(unsigned w, unsigned c2, unsigned s2) {
  unsigned h = (w & 0x000F000Fu) | 0x64006400u;
  half l = (half)((half)(lo(h) - lo(c2)) * (half)lo(s2));
  half u = (half)((half)(hi(h) - hi(c2)) * (half)hi(s2));
  return __pack_half2(l, u);
}
static void tvm_lite_st_shared_v4(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
  unsigned v[4] = {a, b, c, d};
  memcpy(p, v, 16);
}
// cp.async: a thread's copies land at its next wait_all (not before: a kernel reading a tile
// before waiting for it reads the previous tile's data, as it might on the GPU)
thread_local std::vector<std::pair<void*, const void*>> copies;
static void tvm_lite_cp_async16(void* dst, const void* src) { copies.push_back({dst, src}); }
static void tvm_lite_cp_async_wait_all() {
  for (auto& c : copies) memcpy(c.first, c.second, 16);
  copies.clear();
}
// groups: a commit closes the thread's pending copies into a group; wait_group N lands all but
// the newest N groups (copies not yet committed stay in flight)
thread_local std::vector<std::vector<std::pair<void*, const void*>>> groups;
static void tvm_lite_cp_async_commit() { groups.push_back(copies); copies.clear(); }
static void cp_async_wait_group(size_t n) {
  while (groups.size() > n) {
    for (auto& c : groups.front()) memcpy(c.first, c.second, 16);
    groups.erase(groups.begin());
  }
}
static void tvm_lite_cp_async_wait_group0() { cp_async_wait_group(0); }
static void tvm_lite_cp_async_wait_group1() { cp_async_wait_group(1); }
static void tvm_lite_cp_async_wait_group2() { cp_async_wait_group(2); }
static void tvm_lite_cp_async_wait_group3() { cp_async_wait_group(3); }
static void tvm_lite_cp_async_wait_group4() { cp_async_wait_group(4); }
static float tvm_lite_ex2(float x) { return exp2f(x); }
// split tickets (in "L2", under a lock for a cluster's blocks run at once): the last split of a
// tile is the last to arrive; reads of other workgroups' partials from "L2" are plain reads
static unsigned split_tickets[4096];
static std::mutex split_m;
static int tvm_lite_split_last(unsigned slot, unsigned splits) {
  __syncthreads();
  if (threadIdx.x == 0) {
    std::lock_guard<std::mutex> l(split_m);
    unsigned old = split_tickets[slot];
    split_tickets[slot] = old >= splits - 1 ? 0 : old + 1;
    blk->split_last_flag = old == splits - 1;
  }
  __syncthreads();
  return blk->split_last_flag;
}
static float tvm_lite_ldcg_f32(const float* p) { return *p; }
static void tvm_lite_ldcg_f32x4(float* d, const float* p) { memcpy(d, p, 16); }
static void tvm_lite_st_f16x2(void* p, float a, float b) { half h[2] = {(half)a, (half)b}; memcpy(p, h, 4); }
// Hopper's wgmma (schedules/gpu_gemm_wgmma.py): operands in shared memory, K-major core
// matrices of 8 rows x 16 bytes, WGMMA_SBO bytes apart in M / N and *_lbo apart in K. Each
// thread computes its own accumulators (warp w % 4 of its warpgroup: rows 16 (w % 4) + l / 4
// (+ 8), columns 8 j + 2 (l % 4) (+ 1)); the fences, commits and waits are no-ops (the kernel
// must not write an operand before its wait, which the GPU run checks).
static const int WGMMA_SBO = 144;
// The prefill attention's wgmma (schedules/gpu_attention_prefill.py, TC_WGMMA) uses core
// matrices 128 bytes apart in M / N (ss: A and B K-major, *_lbo apart in K) and rs_tb: A from
// registers (each warp its 16 rows, mma.sync's A fragment: a0 (row g, k 2t..), a1 (row g + 8),
// a2 (k + 8), a3 (both)), B MN-major (trans-b): core matrices of 8 K rows x 16 bytes of N,
// b_lbo bytes apart in K and b_sbo in N.
static float core_at(const void* base, unsigned lbo, unsigned sbo, int mn, int k, bool mn_major) {
  const char* p = (const char*)base + (k / 8) * lbo + (mn / 8) * sbo +
                  (mn_major ? (k % 8) * 16 + (mn % 8) * 2 : (mn % 8) * 16 + (k % 8) * 2);
  half v; memcpy(&v, p, 2); return (float)v;
}
static void wgmma_ss(float* d, const void* a, const void* b, unsigned al, unsigned bl,
                     unsigned sbo, int n) {  // A and B K-major, core matrices sbo apart in M / N
  int g = lane_id / 4, t = lane_id % 4 * 2, w = warp_id % 4;
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 4; ++c) {
      int r = 16 * w + g + (c / 2) * 8, col = 8 * j + t + c % 2;
      float s = 0;
      for (int k = 0; k < 16; ++k) s += core_at(a, al, sbo, r, k, false) * core_at(b, bl, sbo, col, k, false);
      d[j * 4 + c] += s;
    }
}
static void tvm_lite_wgmma_m64n64k16(float* d, const void* a, const void* b, unsigned al, unsigned bl) { wgmma_ss(d, a, b, al, bl, WGMMA_SBO, 64); }
static void tvm_lite_wgmma_m64n128k16(float* d, const void* a, const void* b, unsigned al, unsigned bl) { wgmma_ss(d, a, b, al, bl, WGMMA_SBO, 128); }
static void tvm_lite_wgmma_m64n256k16(float* d, const void* a, const void* b, unsigned al, unsigned bl) { wgmma_ss(d, a, b, al, bl, WGMMA_SBO, 256); }
static void tvm_lite_wgmma_m64n192k16(float* d, const void* a, const void* b, unsigned al, unsigned bl) { wgmma_ss(d, a, b, al, bl, WGMMA_SBO, 192); }
static void wgmma_rs(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                     const void* b, unsigned bl, unsigned bs, int n, bool b_mn_major) {
  unsigned* mine = blk->xa[warp_id][lane_id];
  mine[0] = a0; mine[1] = a1; mine[2] = a2; mine[3] = a3;
  warp_sync();
  float A[16][16];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) {
      unsigned word = blk->xa[warp_id][(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)];
      A[r][k] = (float)from_bits((word >> (16 * (k % 2))) & 0xFFFF);
    }
  warp_sync();
  int g = lane_id / 4, t = lane_id % 4 * 2;
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 4; ++c) {
      int r = g + (c / 2) * 8, col = 8 * j + t + c % 2;
      float s = 0;
      for (int k = 0; k < 16; ++k) s += A[r][k] * core_at(b, bl, bs, col, k, b_mn_major);
      d[j * 4 + c] += s;
    }
}
static void wgmma_rs_tb(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                        const void* b, unsigned bl, unsigned bs, int n) {
  wgmma_rs(d, a0, a1, a2, a3, b, bl, bs, n, true);
}
#define TVM_LITE_WGMMA_N(N) \
  static void tvm_lite_wgmma_ss_m64n##N##k16(float* d, const void* a, const void* b, unsigned al, unsigned bl) { wgmma_ss(d, a, b, al, bl, 128, N); } \
  static void tvm_lite_wgmma_rs_m64n##N##k16_tb(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, const void* b, unsigned bl, unsigned bs) { wgmma_rs_tb(d, a0, a1, a2, a3, b, bl, bs, N); }
TVM_LITE_WGMMA_N(16) TVM_LITE_WGMMA_N(32) TVM_LITE_WGMMA_N(48) TVM_LITE_WGMMA_N(64)
TVM_LITE_WGMMA_N(80) TVM_LITE_WGMMA_N(96) TVM_LITE_WGMMA_N(112) TVM_LITE_WGMMA_N(128)
TVM_LITE_WGMMA_N(144) TVM_LITE_WGMMA_N(160) TVM_LITE_WGMMA_N(176) TVM_LITE_WGMMA_N(192)
TVM_LITE_WGMMA_N(208) TVM_LITE_WGMMA_N(224) TVM_LITE_WGMMA_N(240) TVM_LITE_WGMMA_N(256)
// The GEMM with W in registers (schedules/gpu_gemm_wgmma_wreg.py): A from registers (mma.sync's
// A fragment, as rs_tb), B K-major in shared memory, core matrices WGMMA_SBO bytes apart in N.
static void wgmma_rs_k(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                       const void* b, unsigned bl, int n) {
  wgmma_rs(d, a0, a1, a2, a3, b, bl, WGMMA_SBO, n, false);
}
static void tvm_lite_gemm_wgmma_rs_m64n64k16(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, const void* b, unsigned bl) { wgmma_rs_k(d, a0, a1, a2, a3, b, bl, 64); }
static void tvm_lite_gemm_wgmma_rs_m64n128k16(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, const void* b, unsigned bl) { wgmma_rs_k(d, a0, a1, a2, a3, b, bl, 128); }
static void tvm_lite_gemm_wgmma_rs_m64n256k16(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, const void* b, unsigned bl) { wgmma_rs_k(d, a0, a1, a2, a3, b, bl, 256); }
// one k16 step's A fragment: a[2i] (feature lo = low half of z2 / s2) and a[2i + 1] (feature
// hi) from byte b and b + 2 of word i (p1, p2): its low nibble the even k, its high nibble the odd
static void tvm_lite_dq_afrag(unsigned* a, const void* p1, const void* p2, unsigned b,
                              unsigned z2, unsigned s2) {
  const void* p[2] = {p1, p2};
  for (int i = 0; i < 2; ++i) {
    unsigned w; memcpy(&w, p[i], 4);
    for (int c = 0; c < 2; ++c) {
      half z = from_bits((z2 >> (16 * c)) & 0xFFFF), s = from_bits((s2 >> (16 * c)) & 0xFFFF);
      unsigned byte = (w >> (8 * (b + 2 * c))) & 0xFF;
      half v[2];
      for (int e = 0; e < 2; ++e) {
        half q = (half)(float)(1024 + ((byte >> (4 * e)) & 0xF));
        v[e] = (half)((half)(q - z) * s);
      }
      a[2 * i + c] = __pack_half2(v[0], v[1]);
    }
  }
}
static unsigned tvm_lite_lds_u32(const void* p) { unsigned r; memcpy(&r, p, 4); return r; }
static void tvm_lite_wgmma_fence() {}
static void tvm_lite_wgmma_commit() {}
static void tvm_lite_wgmma_wait0() {}
static void tvm_lite_fence_async_shared() {}
// one packed word dequantized K-major: column lo's 4 rows at p, column hi's at p + 16 bytes
static void tvm_lite_dq_kmajor(void* p, unsigned w, unsigned z2, unsigned s2) {
  for (int c = 0; c < 2; ++c) {
    half z = from_bits((z2 >> (16 * c)) & 0xFFFF), s = from_bits((s2 >> (16 * c)) & 0xFFFF);
    half* out = (half*)((char*)p + 16 * c);
    for (int i = 0; i < 4; ++i) {
      half q = (half)(float)(1024 + ((w >> (16 * c + 4 * i)) & 0xF));
      out[i] = (half)((half)(q - z) * s);
    }
  }
}
static float tvm_lite_quad_max(float v) {  // over the 4 lanes of a quad (__shfl_xor 1, 2)
  blk->xf[warp_id][lane_id] = v; warp_sync();
  float* q = &blk->xf[warp_id][lane_id & ~3];
  float r = max(max(q[0], q[1]), max(q[2], q[3]));
  warp_sync();
  return r;
}
static float tvm_lite_quad_sum(float v) {
  blk->xf[warp_id][lane_id] = v; warp_sync();
  float* q = &blk->xf[warp_id][lane_id & ~3];
  float r = (q[0] + q[1]) + (q[2] + q[3]);
  warp_sync();
  return r;
}
static int tvm_lite_warp_none(int v) {  // __all_sync(~0, v == 0)
  blk->xi[warp_id][lane_id] = v; warp_sync();
  int r = 1;
  for (int l = 0; l < 32; ++l) r &= blk->xi[warp_id][l] == 0;
  warp_sync();
  return r;
}
static unsigned tvm_lite_pack_half2(float lo, float hi) { return __pack_half2((half)lo, (half)hi); }
static void named_arrive(int id, int count, bool wait) {  // (NamedBar: at the top)
  NamedBar& b = blk->named_bars[id];
  std::unique_lock<std::mutex> l(b.m);
  long g = b.gen;
  if (++b.arrived == count) { b.arrived = 0; ++b.gen; b.cv.notify_all(); return; }
  if (wait) b.cv.wait(l, [&] { return b.gen != g; });
}
static void tvm_lite_bar_sync(int id, int count) { named_arrive(id, count, true); }
static void tvm_lite_bar_arrive(int id, int count) { named_arrive(id, count, false); }
static void tvm_lite_wgmma_wait1() {}
static uint4 tvm_lite_lds_v4(const void* p) { uint4 r; memcpy(&r, p, 16); return r; }
static void tvm_lite_st_v4(void* p, uint4 v) { memcpy(p, &v, 16); }
static void tvm_lite_syncwarp() { warp_sync(); }
// Thread-block clusters (kernels declared with __cluster_dims__): barrier.cluster.arrive.release
// and wait.acquire by every thread of the cluster's blocks
static void tvm_lite_cluster_sync() { blk->cluster->bar.arrive_and_wait(); }
// distributed shared memory (mapa + ld.shared::cluster.v4.f32): p in the calling block's dynamic
// shared memory, the 16 bytes at its offset in that of the cluster's block `rank`
static float4 tvm_lite_ld_dsmem_f32x4(const void* p, int rank) {
  long off = (const unsigned char*)p - blk->dyn_shared;
  Cluster* c = blk->cluster;
  if (off < 0 || off + 16 > (long)sizeof(blk->dyn_shared) || off % 16 || rank < 0 ||
      rank >= (int)c->blocks.size()) {
    fprintf(stderr, "tvm_lite_ld_dsmem_f32x4: offset %ld of the dynamic shared memory, rank %d "
                    "of %d\n", off, rank, (int)c->blocks.size());
    abort();
  }
  Block* o = c->blocks[rank];
  if (o->running.load() == 0) {  // its shared memory is gone on the GPU
    fprintf(stderr, "tvm_lite_ld_dsmem_f32x4: block rank %d read after it exited\n", rank);
    abort();
  }
  float4 r; memcpy(&r, o->dyn_shared + off, 16); return r;
}
static void tvm_lite_st_f32x2(void* p, float a, float b) {  // st.v2.f32: 8 bytes, 8-aligned
  if ((uintptr_t)p % 8) { fprintf(stderr, "tvm_lite_st_f32x2: misaligned %p\n", p); abort(); }
  float v[2] = {a, b}; memcpy(p, v, 8);
}
// Run a grid of workgroups of th threads, a cluster (cx, cy, cz) of them at a time: each block
// its own Block (shared memory, barriers), all the cluster's threads at once; clusters one after
// another (with no cluster, workgroups one after another in blockIdx order x, then y, then z)
static void launch(int gx, int gy, int gz, int th, std::function<void()> fn,
                   int cx = 1, int cy = 1, int cz = 1) {
  if (gx % cx || gy % cy || gz % cz) {
    fprintf(stderr, "grid (%d, %d, %d) not a multiple of the cluster (%d, %d, %d)\n",
            gx, gy, gz, cx, cy, cz);
    exit(1);
  }
  int n = cx * cy * cz;
  for (int kz = 0; kz < gz / cz; ++kz)
  for (int ky = 0; ky < gy / cy; ++ky)
  for (int kx = 0; kx < gx / cx; ++kx) {
    Cluster c(n * th);
    std::vector<std::unique_ptr<Block>> blocks;
    for (int r = 0; r < n; ++r) {
      blocks.push_back(std::make_unique<Block>(th, &c, r));
      c.blocks.push_back(blocks.back().get());
    }
    std::vector<std::thread> ts;
    for (int r = 0; r < n; ++r) {  // rank r = x + y cx + z cx cy
      d3 b = {kx * cx + r % cx, ky * cy + r / cx % cy, kz * cz + r / (cx * cy)};
      Block* me = c.blocks[r];
      for (int t = 0; t < th; ++t)
        ts.emplace_back([=] {
          blk = me; threadIdx = {t, 0, 0}; blockIdx = b; lane_id = t % 32; warp_id = t / 32;
          fn();
          --me->running;
          me->cluster->bar.arrive_and_drop();  // (an exited thread no longer holds it up)
        });
    }
    for (auto& x : ts) x.join();
  }
}
template <class T> static T* load(const char* f, size_t n) {
  T* p = new T[n]; FILE* h = fopen(f, "rb"); fread(p, sizeof(T), n, h); fclose(h); return p;
}
'''

_KERNEL = re.compile(r'extern "C" __global__ void (?:__cluster_dims__\((\d+), (\d+), (\d+)\) )?'
                     r'__launch_bounds__\((\d+)\) (\w+)\(([^)]*)\) \{')
# the no-op marker a cluster kernel calls (its cluster shape is the __cluster_dims__ above it)
_CLUSTER_MARK = re.compile(r"tvm_lite_cluster_dims_(\d+)_(\d+)_(\d+)\(\);")


def _kernels(src: str) -> tuple[str, list]:
    """The kernels' C++ (declarations dropped, shared memory made the workgroup's ``Block``'s)
    and, per kernel, ``(name, threads, [(ctype, param name)], (cx, cy, cz))``: the cluster dims
    of its ``__cluster_dims__``, (1, 1, 1) where it has none. The helpers' CUDA definitions (in
    the preamble, before the first ``extern "C"``) are left out: the shim defines each."""
    body = src[src.index('extern "C"'):]
    lines = [ln for ln in body.splitlines()
             if not (ln.startswith('extern "C"') and ln.rstrip().endswith(";"))]
    code = "\n".join(lines).replace('extern "C" ', "")
    code = re.sub(r"extern __shared__ __align__\(\d+\) (\w+) (\w+)\[\];",
                  r"\1* \2 = (\1*)blk->dyn_shared;", code)
    # a static __shared__ array: the workgroup's own, numbered (block_static)
    count = iter(range(1 << 30))
    code = re.sub(r"__shared__ (?:(?:alignas|__align__)\(\d+\) )?(\w+) (\w+)((?:\[\d+\])*);",
                  lambda m: f"{m[1]} (&{m[2]}){m[3]} = block_static<{m[1]}{m[3]}>({next(count)});",
                  code)
    # setmaxnreg moves registers between warpgroups, the cluster marker marks: nothing to emulate
    code = re.sub(r"tvm_lite_setmaxnreg_(inc|dec)_\d+\(\);", ";", code)
    code = _CLUSTER_MARK.sub(";", code)
    found = []
    heads = list(_KERNEL.finditer(body))
    for i, m in enumerate(heads):
        cx, cy, cz, threads, name, params = m.groups()
        cluster = (int(cx), int(cy), int(cz)) if cx else (1, 1, 1)
        kernel = body[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(body)]
        marks = {tuple(map(int, d)) for d in _CLUSTER_MARK.findall(kernel)}
        if marks and marks != {cluster}:
            raise ValueError(f"kernel {name} marks cluster dims {sorted(marks)} but is declared "
                             f"with {cluster} (__cluster_dims__)")
        args = []
        for prm in params.split(","):
            ctype, pname = prm.replace("__restrict__", "").split()[-2:]
            args.append((ctype, pname))
        found.append((name, int(threads), args, cluster))
    return code, found


def run_kernels(src: str, arrays: dict, grids: dict, out_name: str, out_size: int,
             workdir: Path) -> np.ndarray:
    """Run the kernels of ``src`` in order. ``arrays``: a numpy array per kernel parameter name
    (``p0_ptr``...; views such as ``codes32_ptr`` are given under their own names); a pointer
    parameter not given is a zero fp32 workspace of ``out_size * 8`` floats. ``grids``: kernel
    name -> ``(gx, gy, gz)`` (in blocks; a multiple of the kernel's cluster dims, whose clusters
    run one after another, the blocks of each at once). Returns the ``out_name`` buffer (fp16)
    after the last kernel."""
    return run_kernels_to(src, arrays, grids, {out_name: (out_size, np.float16)}, workdir,
                          out_size * 8)[out_name]


def run_kernels_to(src: str, arrays: dict, grids: dict, outputs: dict, workdir: Path,
                   workspace: int) -> dict:
    """:func:`run_kernels` reading back several buffers: ``outputs`` maps a parameter name to
    ``(elements, dtype)``; a pointer parameter not in ``arrays`` is a zero workspace of
    ``workspace`` elements. Returns the named buffers after the last kernel."""
    code, kernels = _kernels(src)
    ctypes = {"half": np.float16, "uint": np.uint32, "float": np.float32}
    main = ["int main() {"]
    declared = set()
    for name, threads, args, cluster in kernels:
        if name not in grids:
            raise ValueError(f"no grid given for kernel {name}")
        if any(g % c for g, c in zip(grids[name], cluster)):
            raise ValueError(f"kernel {name}: grid {grids[name]} not a multiple of its cluster "
                             f"{cluster}")
        for ctype, pname in args:
            if pname in declared:
                continue
            declared.add(pname)
            ctype = ctype.rstrip("*")
            if pname in arrays:
                data = np.ascontiguousarray(arrays[pname]).astype(ctypes[ctype])
                path = workdir / f"{pname}.bin"
                data.tofile(path)
                main.append(f'  {ctype}* {pname} = load<{ctype}>("{path}", {data.size});')
            else:
                main.append(f"  {ctype}* {pname} = new {ctype}[{workspace}]();")
        gx, gy, gz = grids[name]
        call = ", ".join(p for _, p in args)
        cx, cy, cz = cluster
        main.append(f"  launch({gx}, {gy}, {gz}, {threads}, [=] {{ {name}({call}); }}, "
                    f"{cx}, {cy}, {cz});")
    for name, (size, dtype) in outputs.items():
        main.append(f'  {{ FILE* h = fopen("{workdir / (name + ".out")}", "wb"); '
                    f"fwrite({name}, {np.dtype(dtype).itemsize}, {size}, h); fclose(h); }}")
    main.append("  return 0;\n}")
    cpp = workdir / "kernel.cc"
    cpp.write_text(SHIM + code + "\n" + "\n".join(main))
    exe = workdir / "kernel"
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", str(cpp), "-o", str(exe)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return {name: np.fromfile(workdir / (name + ".out"), dtype=dtype)
            for name, (_, dtype) in outputs.items()}
