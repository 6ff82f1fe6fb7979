"""tvm_lite's Relax passes, one per file, each named for what it does."""

from .add_decode_function import AddDecodeFunction
from .remove_noop_ops import RemoveNoOpOps

__all__ = ["AddDecodeFunction", "RemoveNoOpOps"]
