"""What tvm_lite's CPU rules read from an LLVM target: the vector width and the register tiles.

The vector width comes from the target's own features (``-mcpu``/``-mattr``/``-mtriple``; a bare
``"llvm"`` is this machine's CPU: ``tvm_lite.target.parse_target``): 512 bits with AVX-512, 256
with AVX2/AVX, 128 on aarch64 (NEON) and anything else. The tiles are sized from it so that the
accumulators of one micro-kernel fill most of the vector registers (32 with AVX-512 and on aarch64,
16 with AVX2) and the rest hold a weight row and the broadcast activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.target import Target, codegen


@dataclass(frozen=True)
class CPUTiles:
    """Register tiles of the CPU matmul rules, in elements of the accumulator dtype (fp32)."""

    lanes: int  # fp32 lanes of one vector register
    gemm_rows: int  # prefill GEMM micro-kernel: rows of x (broadcast) ...
    gemm_vectors: int  # ... times this many vectors of output columns, accumulated in registers
    gemv_vectors: int  # decode GEMV: vectors of output columns one task accumulates in registers

    @property
    def gemm_cols(self) -> int:
        return self.gemm_vectors * self.lanes

    @property
    def gemv_cols(self) -> int:
        return self.gemv_vectors * self.lanes


def _has(feature: str, target: Target) -> bool:
    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # pylint: disable=broad-except  (a "c" target, an unknown -mcpu)
        return False


def vector_bits(target: Target) -> int:
    """The width of the target's vector registers as LLVM will use them."""
    if _has("avx512f", target):
        return 512
    if _has("avx2", target) or _has("avx", target):
        return 256
    return 128  # aarch64 NEON, SSE, or unknown


def cpu_tiles(target: Target) -> CPUTiles:
    """The register tiles for ``target`` (6 x 2 vectors of accumulators in the GEMM: 12 of the
    16 AVX2 registers; 4 vectors per GEMV task)."""
    lanes = vector_bits(target) // 32
    return CPUTiles(lanes=lanes, gemm_rows=6, gemm_vectors=2, gemv_vectors=4)


def weight_panel(target: Target) -> int | None:
    """The panel width a build for ``target`` stores its weights in
    (``relax_passes/pack_weight_panels.py``): the GEMM micro-kernel's columns, which are also a
    decode GEMV task's; None for a GPU target."""
    if target.kind.name != "llvm":
        return None
    return cpu_tiles(target).gemm_cols


__all__ = ["CPUTiles", "cpu_tiles", "vector_bits", "weight_panel"]
