"""Schedule rules, keyed by target profile.

``rules_for(target)`` returns the DLight rules tvm_lite applies to a target: its own CPU rules on
``llvm``; on GPUs (``adreno``, ``mali``, ``cuda``, generic) the rules of that profile
(:mod:`.profiles`), in the order they are tried:

0. :class:`.gpu_attention.Attention` -- the fused attention kernels (prefill, decode);
   :class:`.fused_norm.FusedRMSNorm` -- the fused residual-add + RMSNorm kernels, one kernel each;
   :class:`.gpu_elementwise.GPUKVAppendHalves` -- the K/V append over the halves of a rotated
   row (``relax_passes.fuse_kv_append.PAIRED_HALVES``), in 16-byte vectors;
1. :class:`.gpu_gemv.GPUDecodeGEMV` -- decode GEMV (``M == 1``), fp16 and 4-bit dequant weights;
2. :class:`.gpu_gemm.GPUPrefillGEMM` -- prefill GEMM (dynamic ``M``), dequant in the tile load;
3. DLight's ``gpu.Matmul`` and ``gpu.GEMV`` for the matmuls these leave (attention's batched
   products, ``W[N, K]`` layouts), GEMV behind ``StaticBuffersOnly`` (:mod:`.guards`);
4. reductions (:mod:`.gpu_reduction`), injective kernels in vectors
   (:class:`.gpu_elementwise.GPUVectorElementwise`), then DLight's ``gpu.Fallback`` last.

``stock_gpu_rules()`` is the plain DLight list (what tvm_lite used before), kept for benchmarks.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.target import Target

from . import gpu_attention
from .cpu import CPUMatmul, CPUParallel
from .cpu_dequant import CPUDequantMatmul
from .cpu_gemm import CPUWeightMatmul
from .fused_norm import FusedRMSNorm
from .gpu_elementwise import GPUKVAppendHalves, GPUVectorElementwise
from .gpu_gemm import GPUPrefillGEMM
from .gpu_gemv import GPUDecodeGEMV
from .gpu_gemv_half2 import half2_kernel  # noqa: F401  (registers the packed GEMV)
from .gpu_reduction import reduction_rules
from .guards import StaticBuffersOnly
from .profiles import GPUProfile, fit_to_target, gpu_profile


def profile_of(target: Target) -> str:
    """The schedule profile a target maps to: cpu, adreno, mali, cuda or gpu (generic)."""
    keys = set(target.keys)
    if target.kind.name in ("llvm", "c"):
        return "cpu"
    if "adreno" in keys or target.attrs.get("device") == "adreno":
        return "adreno"
    if "mali" in keys or target.attrs.get("device") == "mali":
        return "mali"
    if target.kind.name == "cuda":
        return "cuda"
    return "gpu"


def stock_gpu_rules() -> list:
    """DLight's default GPU rules (with the static-buffer guard): the baseline in benchmarks."""
    return [dl.gpu.Matmul(), StaticBuffersOnly(dl.gpu.GEMV()), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def gpu_rules(profile: GPUProfile) -> list:
    """tvm_lite's GPU rules for ``profile``, in order, the fallback last."""
    return [gpu_attention.Attention(), FusedRMSNorm(profile), GPUKVAppendHalves(profile),
            GPUDecodeGEMV(profile), GPUPrefillGEMM(profile), dl.gpu.Matmul(),
            StaticBuffersOnly(dl.gpu.GEMV()), *reduction_rules(profile),
            GPUVectorElementwise(profile), dl.gpu.Fallback()]


def gated_gemm_check(target: Target):
    """What ``FuseGatedEpilogue`` asks (``relax_passes/fuse_gated_epilogue.py``): a function
    ``takes(gemm PrimFunc) -> bool`` telling whether this target's prefill GEMM rule stores a
    gated epilogue after that GEMM, or None where no GEMM of the target does -- CUDA with
    mma.sync (sm_80+): the mma.sync and warp-specialised kernels, fp16 activations and output,
    ``N`` in whole gate/up block pairs (:func:`.gpu_gemm_mma.match_gemm`)."""
    from tvm import s_tir

    from ..convention import GATE_BLOCK
    from .cuda_mma import mma_supported
    from .gpu_gemm_mma import match_gemm
    from .gpu_gemv import MatchError

    if profile_of(target) != "cuda" or not mma_supported(target):
        return None
    profile = fit_to_target(gpu_profile("cuda"), target)

    def takes(func) -> bool:
        try:
            g = match_gemm(s_tir.Schedule(func), profile)
        except MatchError:
            return False
        return g["final"] is None and g["out_dtype"] == "float16" and g["n"] % (2 * GATE_BLOCK) == 0

    return takes


def rules_for(target: Target) -> list:
    name = profile_of(target)
    if name == "cpu":
        # 4-bit weights (tvm_lite.quant), x @ W (prefill GEMM, decode GEMV), other matmuls, the rest
        return [CPUDequantMatmul(), CPUWeightMatmul(), CPUMatmul(), CPUParallel()]
    return gpu_rules(gpu_profile(name))


__all__ = ["profile_of", "rules_for", "gpu_rules", "stock_gpu_rules", "gpu_profile",
           "gated_gemm_check"]
