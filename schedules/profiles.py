"""Target profiles: the hardware parameters tvm_lite's GPU schedule rules read.

One frozen dataclass per profile -- ``adreno``, ``mali``, ``cuda`` and a generic ``gpu`` -- so a
rule never tests the target kind itself: it asks the profile how wide a wave is, how many threads
a workgroup may have, how much local memory there is and how wide a load should be.

Sources of the numbers: TVM 0.27's own target defaults (``opencl -device=adreno``: warp 1, 256
threads, 16 KiB shared; ``cuda``: warp 32, 1024 threads, 48 KiB static shared), Qualcomm's and
Arm's OpenCL optimization guides (Adreno waves of 64/128 fibers, Mali Valhall warps of 16) and
Transformer-Lite (arXiv 2403.20041, section 3.3). The GEMV cost figures: CUDA's from the
H200 (copy 4,213 GB/s; a lone 256-thread workgroup streamed a 2048 x 256 E0M4 GEMV at ~13 GB/s;
the issue's step had ~3.5 µs of host gap and launch per kernel), the phone GPUs' are estimates
(LPDDR5 bandwidth, an OpenCL enqueue of ~10 µs), not measured here. The warp width here is the *hardware* wave
width the schedule sizes its reductions for; TVM still lowers cross-thread reductions through
local memory where its target says ``thread_warp_size = 1`` (Adreno, Mali), which is correct on
any wave width.

``weights_as_images``: Adreno reads weights fastest through the texture cache (``image2d_t``),
and the paper stores its weights as images. TVM 0.27's stock OpenCL path only has buffers for
DLight schedules (its texture scopes ``global.texture*`` are used by the Adreno conv2d rules, and
this wheel ships no OpenCL runtime to run them), so the rules here always read weights from
buffers; the field records where images would help, for a texture path later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GPUProfile:
    """Parameters of one GPU family, as the schedule rules use them."""

    name: str
    warp_size: int  # hardware wave/warp width (threads that run in lock step)
    max_threads: int  # max threads per workgroup the rules use
    local_memory_bytes: int  # shared/local memory per workgroup the rules may use
    vector_bytes: int  # width of one vectorized global load (16 = float4/uint4)
    compute_units: int  # SMs / shader cores: how many workgroups keep the device busy
    # decode GEMV (M = 1): columns per thread come from vector_bytes; these shape the workgroup
    gemv_threads_n: int  # threads along the output columns (coalesced along N)
    gemv_threads_k: int  # threads along the reduction (summed by a cross-thread reduction)
    gemv_min_workgroups: int  # split K over workgroups until at least this many run
    # prefill GEMM: a workgroup computes a [tile_m, tile_n] tile, each thread [micro_m, micro_n]
    gemm_threads_m: int
    gemm_threads_n: int
    gemm_micro_m: int
    gemm_micro_n: int
    gemm_tile_k: int
    gemv_lanes: int = 1  # vector lanes of the dequant arithmetic (2: half2/ushort2 ops)
    # 4-bit decode GEMV with packed half2 arithmetic (schedules/gpu_gemv_half2.py, CUDA C
    # helpers): rows summed in fp16 before the scale is applied in fp32; 0 = off (the generic
    # per-weight schedule). OpenCL keeps the generic one.
    gemv_half2_rows: int = 0
    gemm_tensor_cores: bool = False  # use DLight's tensor-core matmul where it applies (CUDA)
    # injective kernels with vector_bytes a thread (schedules/gpu_elementwise.py) instead of
    # Fallback's one element a thread: on for CUDA (timed on the H200), off where not timed
    vector_elementwise: bool = False
    # a decode GEMV that computes its input row (an RMSNorm prologue) and has enough one-pass
    # tiles takes gpu_gemv's PROLOGUE_KS split plan (CUDA's half2 GEMV sums the splits in the
    # same kernel; the generic GEMV of the phones adds a summing kernel): on for CUDA (timed on
    # an H100), off where not timed
    gemv_prologue_split: bool = False
    weights_as_images: bool = False  # texture reads would help; TVM 0.27 stock OpenCL: buffers only
    # what a decode GEMV's second (split-K summing) kernel is weighed against (gpu_gemv's plan):
    # the device's copy bandwidth, what one GEMV workgroup streams alone, and what one more
    # kernel in a decode step costs (launch + its share of the host's work), in GB/s and µs
    copy_gbps: float = 200.0
    gemv_workgroup_gbps: float = 10.0
    launch_us: float = 5.0

    @property
    def gemv_rows_per_workgroup(self) -> int:
        """Output columns (rows of ``Wᵀ``) one GEMV workgroup produces, for 2-byte weights."""
        return self.gemv_threads_n * (self.vector_bytes // 2)

    @property
    def gemm_tile(self) -> tuple[int, int, int]:
        return (self.gemm_threads_m * self.gemm_micro_m, self.gemm_threads_n * self.gemm_micro_n,
                self.gemm_tile_k)


ADRENO = GPUProfile(
    name="adreno", warp_size=64, max_threads=256, local_memory_bytes=16384, vector_bytes=8,
    compute_units=6, gemv_threads_n=32, gemv_threads_k=8, gemv_min_workgroups=24,
    gemm_threads_m=8, gemm_threads_n=16, gemm_micro_m=4, gemm_micro_n=4, gemm_tile_k=16,
    weights_as_images=True, copy_gbps=50.0, gemv_workgroup_gbps=4.0, launch_us=10.0)

MALI = GPUProfile(
    name="mali", warp_size=16, max_threads=256, local_memory_bytes=16384, vector_bytes=8,
    compute_units=10, gemv_threads_n=16, gemv_threads_k=16, gemv_min_workgroups=40,
    gemm_threads_m=8, gemm_threads_n=16, gemm_micro_m=4, gemm_micro_n=4, gemm_tile_k=16,
    copy_gbps=40.0, gemv_workgroup_gbps=3.0, launch_us=10.0)

CUDA = GPUProfile(
    name="cuda", warp_size=32, max_threads=1024, local_memory_bytes=49152, vector_bytes=16,
    compute_units=132, gemv_threads_n=32, gemv_threads_k=8, gemv_min_workgroups=528,
    gemm_threads_m=16, gemm_threads_n=16, gemm_micro_m=8, gemm_micro_n=8, gemm_tile_k=16,
    gemm_tensor_cores=True, gemv_half2_rows=32, vector_elementwise=True,
    gemv_prologue_split=True, copy_gbps=4200.0, gemv_workgroup_gbps=13.0, launch_us=3.0)

GPU = GPUProfile(
    name="gpu", warp_size=32, max_threads=256, local_memory_bytes=16384, vector_bytes=8,
    compute_units=16, gemv_threads_n=32, gemv_threads_k=8, gemv_min_workgroups=64,
    gemm_threads_m=8, gemm_threads_n=16, gemm_micro_m=4, gemm_micro_n=4, gemm_tile_k=16)

PROFILES = {p.name: p for p in (ADRENO, MALI, CUDA, GPU)}


def gpu_profile(name: str) -> GPUProfile:
    """The profile called ``name`` (``adreno``, ``mali``, ``cuda``, ``gpu``)."""
    if name not in PROFILES:
        raise ValueError(f"unknown GPU profile '{name}'; known: {sorted(PROFILES)}")
    return PROFILES[name]


def fit_to_target(profile: GPUProfile, target) -> GPUProfile:
    """The profile clipped to what ``target`` declares (a kernel built with a profile for a
    different target -- e.g. the Adreno profile compiled for CUDA to prove its indexing -- must
    still respect that target's thread and shared-memory limits)."""
    max_threads = int(target.attrs.get("max_num_threads", profile.max_threads))
    shared = int(target.attrs.get("max_shared_memory_per_block", profile.local_memory_bytes))
    return replace(profile, max_threads=min(profile.max_threads, max_threads),
                   local_memory_bytes=min(profile.local_memory_bytes, shared))


__all__ = ["GPUProfile", "ADRENO", "MALI", "CUDA", "GPU", "PROFILES", "gpu_profile", "fit_to_target"]
