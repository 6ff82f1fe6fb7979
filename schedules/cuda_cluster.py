"""Thread-block clusters (sm_90+) for tvm_lite's hand-written CUDA kernels.

A *cluster* is a group of workgroups the GPU runs at the same time on one GPC. Each of them can
read the others' shared memory (*distributed shared memory*: ``mapa`` maps an address of this
workgroup's shared memory to the same offset in workgroup ``rank`` of the cluster, and
``ld.shared::cluster`` reads it), and ``barrier.cluster`` is a barrier over all their threads.

A K-split GEMM uses it to add its partial sums up without a second kernel: the ``KS`` workgroups
of one output tile form a cluster, each leaves its fp32 partials in its own shared memory, and
each then sums one ``1 / KS`` share of the tile's rows across the cluster and stores it.

TVM 0.27 launches a kernel with the cluster size compiled into it (``__cluster_dims__``) by a
plain launch. Its CUDA codegen has no way to say that from TIR, so a kernel *asks* for it by
calling the marker :func:`marker` (``tvm_lite_cluster_dims_X_Y_Z()``, which only checks the
cluster size it runs in), and the CUDA source post-processor this module registers
(``tvm_callback_cuda_postproc``, chained to any other) puts ``__cluster_dims__(X, Y, Z)`` on the
declaration and definition of every kernel that calls one. The grid must be a multiple of the
cluster in each dimension.
"""

from __future__ import annotations

import re

import tvm_ffi

from .cuda_mma import cuda_arch

POSTPROC = "tvm_callback_cuda_postproc"  # the global TVM's CUDA codegen calls on the source
_MARKER = re.compile(r"\btvm_lite_cluster_dims_(\d+)_(\d+)_(\d+)\(\)")
_KERNEL = re.compile(r'extern "C" __global__ void ((?:__launch_bounds__\(\d+\) )?)(\w+)\(')


def marker(dims: tuple[int, int, int]) -> str:
    """The name of the helper a kernel calls to be built with cluster ``dims``."""
    return "tvm_lite_cluster_dims_%d_%d_%d" % tuple(dims)


def marker_source(dims: tuple[int, int, int]) -> str:
    """CUDA source of :func:`marker`: it also stops the kernel (``__trap``: a launch error, not a
    wrong result) if it runs in clusters of another size -- built without ``__cluster_dims__``
    because another CUDA source hook replaced this module's."""
    size = dims[0] * dims[1] * dims[2]
    return f"""
__forceinline__ __device__ void {marker(dims)}() {{
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  if (n != {size}u) __trap();
}}
"""


HELPERS = {
    # every thread of every workgroup of the cluster: arrive (its shared stores released to
    # the cluster), then wait for all (their stores acquired)
    "tvm_lite_cluster_sync": r"""
__forceinline__ __device__ void tvm_lite_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
""",
    # 16 bytes at the offset of p (this workgroup's shared memory) in workgroup rank's
    "tvm_lite_ld_dsmem_f32x4": r"""
__forceinline__ __device__ float4 tvm_lite_ld_dsmem_f32x4(const void* p, int rank) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p), r;
  float4 v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(r) : "memory");
  return v;
}
""",
    # two fp32 values in one 8-byte store
    "tvm_lite_st_f32x2": r"""
__forceinline__ __device__ void tvm_lite_st_f32x2(void* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
""",
}


def supported(target) -> bool:
    """Thread-block clusters: a CUDA target of sm_90 or newer."""
    arch = cuda_arch(target)
    return arch is not None and arch >= 90


def helpers_for(dims: tuple[int, int, int]) -> dict:
    """The helpers (name -> CUDA source) a kernel run in clusters of ``dims`` calls: the
    barrier, the distributed shared-memory load, the fp32 pair store and its marker."""
    return {**HELPERS, marker(dims): marker_source(dims)}


def add_cluster_dims(code: str) -> str:
    """``code`` (a CUDA module's source) with ``__cluster_dims__(X, Y, Z)`` on every kernel whose
    body calls a :func:`marker`: its declaration and its definition."""
    heads = list(_KERNEL.finditer(code))
    dims = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(code)
        body = code[head.end():end]
        found = set(_MARKER.findall(body))
        if len(found) > 1:
            raise ValueError(f"kernel {head.group(2)} asks for clusters of {sorted(found)}")
        if found:
            dims[head.group(2)] = found.pop()
    if not dims:
        return code

    def put(m: re.Match) -> str:
        d = dims.get(m.group(2))
        if d is None:
            return m.group(0)
        return (f'extern "C" __global__ void __cluster_dims__({d[0]}, {d[1]}, {d[2]}) '
                f"{m.group(1)}{m.group(2)}(")

    return _KERNEL.sub(put, code)


_registered = False


def register() -> None:
    """Register :func:`add_cluster_dims` as TVM's CUDA source post-processor (once a process;
    chained after one registered before it)."""
    global _registered
    if _registered:
        return
    before = tvm_ffi.get_global_func(POSTPROC, allow_missing=True)

    def postproc(code, target):
        if before is not None:
            code = before(code, target)
        return add_cluster_dims(str(code))

    tvm_ffi.register_global_func(POSTPROC, postproc, override=True)
    _registered = True
