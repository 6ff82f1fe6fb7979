"""tvm_lite's Relax passes, one per file, each named for what it does."""

from .quantize_weight_matmuls import QuantizeWeightMatmuls
from .remove_noop_ops import RemoveNoOpOps

__all__ = ["QuantizeWeightMatmuls", "RemoveNoOpOps"]
