"""tvm_lite's Relax passes, one per file, each named for what it does."""

from .add_decode_function import AddDecodeFunction
from .inplace_kv_cache import InplaceKVCache, KVCacheRewriteError, NoKVCacheError
from .plan_symbolic_arena import PlanSymbolicArena
from .quantize_weight_matmuls import QuantizeWeightMatmuls
from .remove_noop_ops import RemoveNoOpOps
from .split_prefill_decode import SplitPrefillDecode

__all__ = ["AddDecodeFunction", "InplaceKVCache", "KVCacheRewriteError", "NoKVCacheError",
           "PlanSymbolicArena", "QuantizeWeightMatmuls", "RemoveNoOpOps", "SplitPrefillDecode"]
