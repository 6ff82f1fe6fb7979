"""CUDA tensor-core helpers shared by tvm_lite's hand-written kernels (prefill attention, prefill GEMM).

``mma.sync.aligned.m16n8k16`` (fp16 in, fp32 accumulate) and ``ldmatrix`` (8x8 fp16 tiles from
shared memory into the fragment layout ``mma`` expects; ``.trans`` for a ``[k][n]`` operand) are
PTX; each is a small ``__device__`` function here (``HELPERS``: name -> CUDA source) that a
TVMScript kernel calls through ``T.cuda.func_call`` (:func:`call`). TVM's CUDA codegen emits a
helper's source once per kernel module, whichever kernels call it.

Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16"), as the kernels index it: lane
``l`` of a warp holds, of the 16x8 fp32 accumulator, rows ``l // 4`` (elements 0, 1) and
``l // 4 + 8`` (elements 2, 3), columns ``l % 4 * 2 + (0, 1)``. ``ldmatrix.x4`` loads four 8x8
tiles: lane ``l`` gives the address of row ``l % 8`` of tile ``l // 8``. ``cp.async`` copies 16
bytes from global to shared memory in the background (a tile's next load overlaps this one's
products); ``cp.async.wait_all`` waits for the thread's copies.
"""

from __future__ import annotations

_LDSM = r"""
__forceinline__ __device__ uint4 tvm_lite_ldsm_x4%(name)s(const void* p) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p);
  uint4 r;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4%(trans)s.shared.b16 {%%0,%%1,%%2,%%3}, [%%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
  return r;
}
"""

HELPERS = {
    "tvm_lite_ldsm_x4": _LDSM % {"name": "", "trans": ""},
    "tvm_lite_ldsm_x4_trans": _LDSM % {"name": "_trans", "trans": ".trans"},
    "tvm_lite_mma16816": r"""
__forceinline__ __device__ void tvm_lite_mma16816(float* c, unsigned a0, unsigned a1,
                                                  unsigned a2, unsigned a3, unsigned b0,
                                                  unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
""",
    # cp.async (sm_80+): 16 bytes global -> shared without passing through registers; the
    # copies a thread issued complete at its next wait_all (then a barrier makes them visible
    # to the workgroup)
    "tvm_lite_cp_async16": r"""
__forceinline__ __device__ void tvm_lite_cp_async16(void* dst, const void* src) {
  unsigned a = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(a), "l"(src) : "memory");
}
""",
    "tvm_lite_cp_async_wait_all": r"""
__forceinline__ __device__ void tvm_lite_cp_async_wait_all() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}
""",
    "tvm_lite_pack_half2": r"""
__forceinline__ __device__ unsigned tvm_lite_pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
""",
    # two neighbouring fp16 outputs in one 4-byte store (the address 4-byte aligned)
    "tvm_lite_st_f16x2": r"""
__forceinline__ __device__ void tvm_lite_st_f16x2(void* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
""",
    # 16 bytes from shared memory, 16 bytes to memory (both addresses 16-byte aligned), and a
    # warp's barrier (outputs staged through shared memory, then stored a row segment at a time)
    "tvm_lite_lds_v4": r"""
__forceinline__ __device__ uint4 tvm_lite_lds_v4(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}
""",
    "tvm_lite_st_v4": r"""
__forceinline__ __device__ void tvm_lite_st_v4(void* p, uint4 v) {
  *reinterpret_cast<uint4*>(p) = v;
}
""",
    "tvm_lite_syncwarp": r"""
__forceinline__ __device__ void tvm_lite_syncwarp() {
  __syncwarp();
}
""",
}


def call(name: str, *args: str, ret: str = "void") -> str:
    """TVMScript text of a call to helper ``name`` (the kernel's ``from_source`` must get the
    helper dict as ``HELPERS`` in its ``extra_vars``)."""
    return (f'T.cuda.func_call("{name}", {"".join(a + ", " for a in args)}'
            f'source_code=HELPERS["{name}"], return_type="{ret}")')


def cuda_arch(target, default: str = "") -> int | None:
    """The compute capability of a CUDA ``target`` as a number (``sm_90a`` -> 90; ``default``
    where it names no arch), or None for another target or no number."""
    if target is None or target.kind.name != "cuda":
        return None
    digits = "".join(ch for ch in str(target.attrs.get("arch", default)) if ch.isdigit())
    return int(digits) if digits else None


def mma_supported(target) -> bool:
    """``mma.sync.m16n8k16`` with fp32 accumulation and ``ldmatrix``: sm_80 or newer (a CUDA
    target without an arch is taken to be one)."""
    arch = cuda_arch(target, default="sm_90")
    return arch is not None and arch >= 80


__all__ = ["HELPERS", "call", "cuda_arch", "mma_supported"]
