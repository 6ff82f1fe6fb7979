"""Schedule rules, keyed by target profile.

``rules_for(target)`` returns the DLight rules tvm_lite applies to a target: its own CPU rules on
``llvm``; on GPUs (``adreno``, ``mali``, ``cuda``, generic) the stock DLight GPU rules for now.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.target import Target

from . import cpu, gpu_attention
from .guards import StaticBuffersOnly


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


def rules_for(target: Target) -> list:
    if profile_of(target) == "cpu":
        return cpu.rules()
    return [gpu_attention.Attention(),  # tvm_lite's fused attention kernels (issue 6)
            dl.gpu.Matmul(), StaticBuffersOnly(dl.gpu.GEMV()), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


__all__ = ["profile_of", "rules_for"]
